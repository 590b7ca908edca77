"""COFS-DPO (training/cofs.py): OFS-DPO domain after domain, then the fast modules combined linearly."""
import json

import pytest
import torch

from prefops.training import adapters, cofs, config as C, loop as L
from test_training import make_config

pytest.importorskip("peft")

OFS = {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"], "lr_ratio": 4.0}


def test_combination_is_the_weighted_sum_in_float64():
    g = torch.Generator().manual_seed(4)
    shapes = [(3, 5), (7,), (2, 2, 3)]
    modules = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    got = cofs.combine(modules, weights)
    for i, shape in enumerate(shapes):
        want = torch.zeros(shape, dtype=torch.float64)
        for d in range(3):
            want += weights[d] * modules[d][i]
        assert torch.allclose(got[i], want, rtol=1e-15, atol=1e-15)
    with pytest.raises(ValueError, match="one weight per module"):
        cofs.combine(modules, weights[:2])


def write_domain(path, digit, count=24):
    """Preference rows of one domain: prompts of one style, the chosen answer repeats `digit`."""
    rows = [{"prompt": f"{digit}{i}=", "chosen": digit * (1 + i % 3), "rejected": str(i % 10) * 2}
            for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_cofs_trains_each_domain_then_combines_the_fast_modules(tmp_path, monkeypatch):
    domains = [write_domain(tmp_path / "a.jsonl", "1"), write_domain(tmp_path / "b.jsonl", "7")]
    config = make_config(tmp_path, data=domains[0], sft_steps=0, steps=2, eval_every=2, checkpoint_every=2,
                         reference_update="never", eval_fraction=0.25,
                         ofs_dpo={**OFS, "domains": domains, "combine_weights": [0.25, 0.75]})
    trainer = L.Trainer(config)
    captured, run_domains = [], cofs.run_domains
    monkeypatch.setattr(cofs, "run_domains", lambda t, log: captured.append(run_domains(t, log)))
    trainer.train()
    (modules,) = captured
    assert len(modules) == 2 and not all(torch.equal(a, b) for a, b in zip(*modules)), "each domain trained"
    fast = [p.detach().double() for p in adapters.adapter_parameters(trainer.model, "fast")]
    for i, value in enumerate(fast):
        assert torch.allclose(value, 0.25 * modules[0][i].double() + 0.75 * modules[1][i].double(), atol=1e-7)
    log = [json.loads(line) for line in open(f"{config.out_dir}/log.jsonl")]
    combined = [r for r in log if r.get("cofs/combined")]
    assert [r["cofs/domain"] for r in combined] == [0, 1] and all(r["loss"] > 0 for r in combined)
    assert sum(1 for r in log if r["kind"] == "train") == 4  # two steps per domain


@pytest.mark.parametrize("ofs, overrides, message", [
    ({"domains": ["a.jsonl"]}, {}, "ofs_dpo.domains must be a list of >= 2 data sources"),
    ({"domains": ["a", "b"], "combine_weights": [0.5, 0.6]}, {}, "combine_weights must be a list of numbers >= 0 "
                                                                 "summing to 1"),
    ({"domains": ["a", "b"], "combine_weights": [1.0]}, {}, "needs one weight per domain"),
    ({"combine_weights": [0.5, 0.5]}, {}, "weighs the modules of ofs_dpo.domains"),
    ({"domains": ["a", "b"]}, {"resume": True}, "unset resume"),
])
def test_cofs_config_errors(tmp_path, ofs, overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        make_config(tmp_path, reference_update="never", ofs_dpo={**OFS, **ofs}, **overrides)
