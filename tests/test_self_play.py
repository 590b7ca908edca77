"""Self-play per-response losses (SPPO, GPO, SPO): their targets from a judge's preferences, and the online
loop feeding them (pairs: responses). The losses themselves are checked in test_listwise_losses.py
(float64, from the papers) and, fused against reference, in test_training_listwise.py."""
import math
import sys

import pytest
import torch

from prefops.losses import response_targets
from prefops.training import config as C
from prefops.training.online import OnlineTrainer
from test_online import judge_module, make_config, records, sort_quality


def random_preferences(p, k, seed):
    """[P, K, K] with P(i > j) + P(j > i) = 1, one failed comparison (NaN both ways)."""
    g = torch.Generator().manual_seed(seed)
    upper = torch.rand(p, k, k, generator=g, dtype=torch.float64) * 0.98 + 0.01
    prefs = torch.full((p, k, k), 0.5, dtype=torch.float64)
    for b in range(p):
        for i in range(k):
            for j in range(i + 1, k):
                prefs[b, i, j], prefs[b, j, i] = upper[b, i, j], 1 - upper[b, i, j]
    prefs[1, 0, 2] = prefs[1, 2, 0] = math.nan
    return prefs


def test_response_targets_are_the_papers_means():
    """SPPO's P̂(y ≻ π_t) = (1/K) Σ_j P(y ≻ y_j) (the sample itself at ½) and GPO's mean logit, over the
    comparisons that did not fail."""
    prefs = random_preferences(3, 5, seed=3)
    logit = lambda q: math.log(q / (1 - q))  # noqa: E731
    for kind, value, own in (("win_rate", lambda q: q, 0.5), ("preference_score", logit, 0.0)):
        got = response_targets(prefs, kind)
        for b in range(3):
            for i in range(5):
                terms = [own if i == j else value(float(prefs[b, i, j])) for j in range(5)
                         if i == j or not math.isnan(float(prefs[b, i, j]))]
                assert got[b, i].item() == pytest.approx(sum(terms) / len(terms), rel=1e-12, abs=1e-12), (kind, b, i)
    # With every comparison answered the win rates of a prompt average ½: SPO's baseline.
    answered = response_targets(prefs[[0, 2]], "win_rate")
    assert torch.allclose(answered.mean(1), torch.full((2,), 0.5, dtype=torch.float64))
    certain = prefs.clone()
    certain[2, 3, 4], certain[2, 4, 3] = 1.0, 0.0
    with pytest.raises(ValueError, match=r"prompt 2: P\(y_3 > y_4\) = 1 has no finite logit"):
        response_targets(certain, "preference_score")
    with pytest.raises(ValueError, match="kind must be win_rate or preference_score"):
        response_targets(prefs, "score")


@pytest.mark.parametrize("loss_type", ["sppo_response", "gpo", "spo"])
def test_online_self_play_trains_on_each_samples_target(tmp_path, monkeypatch, loss_type):
    """The judge is Bradley-Terry on a known quality q, P(a > b) = σ(q_a - q_b): each list's targets are then
    (1/K) Σ_j σ(q_i - q_j) (win rates) or (1/K) Σ_j (q_i - q_j) (preference scores), every sample kept."""
    monkeypatch.setitem(sys.modules, "online_judges", judge_module())
    config = make_config(tmp_path, loss_type=loss_type, reference_update="round", online={
        "judge": "pairwise:online_judges:prefer", "pairs": "responses", "rounds": 2, "prompts_per_round": 4})
    trainer = OnlineTrainer(config)
    captured = []
    new_round = trainer.new_round
    trainer.new_round = lambda index, ref: captured.append(new_round(index, ref)) or captured[-1]
    trainer.train()
    train = [r for r in records(config.out_dir, "train") if r["stage"] == "dpo"]
    assert len(captured) == 2 and len(train) == 4 and all(math.isfinite(r["loss"]) for r in train)
    for current in captured:
        assert len(current.records) == 4 and current.stats["pairs"] == 4 * 4
        for record in current.records:
            q = [sort_quality(record.prompt, c) for c in record.completions]
            if loss_type == "gpo":
                expected = [sum(a - b for b in q) / len(q) for a in q]
            else:
                expected = [sum(1 / (1 + math.exp(b - a)) for b in q) / len(q) for a in q]
            assert record.scores == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("overrides, message", [
    (dict(loss_type="sppo_response", online={"pairs": "ranked"}), "train on lists with per-response targets"),
    (dict(loss_type="plackett_luce", online={"pairs": "responses"}), "the other listwise losses on ranked lists"),
    (dict(loss_type="sigmoid", online={"pairs": "responses"}), "the others on pairs"),
    (dict(loss_type="gpo", reference_update="round", online={"pairs": "responses"}),
     "loss_type gpo regresses onto mean logits of P\\(a > b\\): online.judge must be pairwise"),
])
def test_self_play_config_errors(tmp_path, overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        make_config(tmp_path, online=overrides.pop("online"), **overrides)
