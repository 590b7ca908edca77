"""Two runs on the same inputs give bitwise-equal values and gradients: every path (stored, chunked,
sliced, lean) of every loss family, by default and in deterministic mode (prefops.determinism), on CPU.

On CPU every sum runs in a fixed order anyway; what can differ is code that adds in an order of its
own choosing, which the planted bug stands for: per-sequence sums whose terms are shuffled between
runs (as CUDA's atomics add them in arrival order) must fail the check. Deterministic mode's sorted
sums and fixed kernel configurations run here too, against the default's values. The GPU check is
tests/test_gpu_paths.py::test_group_paths_repeat_bitwise.
"""
import pytest
import torch

import prefops
import prefops.chunks
import prefops.determinism
import prefops.per_sequence
import prefops.sequences
from conftest import assert_fp32_close
from prefops import strategy

SEQUENCES, LENGTH, HIDDEN, VOCAB = 8, 9, 24, 70
PAIRS = SEQUENCES // 2
# budget picks stored when every logit gradient fits, chunked when one pair's does (prefops.config).
PATHS = {"stored": dict(strategy="budget", budget="1GB"), "chunked": dict(strategy="budget", budget=20_000),
         "sliced": dict(strategy="sliced"), "lean": dict(strategy="lean", backend="triton")}
# A completion is a group of its own: half a pair's logits.
UNPAIRED_PATHS = {**PATHS, "chunked": dict(strategy="budget", budget=10_000)}
# Per-token ops have no loss groups: every strategy but lean runs them sliced.
TOKEN_PATHS = {"sliced": PATHS["sliced"], "lean": PATHS["lean"]}


def inputs(seed):
    """Packed tokens of 8 sequences (pair i: sequences i and 4 + i) with a reference model's states."""
    g = torch.Generator().manual_seed(seed)
    tensors = dict(hidden=torch.randn(SEQUENCES * LENGTH, HIDDEN, generator=g),
                   weight=torch.randn(VOCAB, HIDDEN, generator=g) * 3 / HIDDEN**0.5,
                   ref_hidden=torch.randn(SEQUENCES * LENGTH, HIDDEN, generator=g),
                   ref_weight=torch.randn(VOCAB, HIDDEN, generator=g) * 3 / HIDDEN**0.5,
                   targets=torch.randint(0, VOCAB, (SEQUENCES * LENGTH,), generator=g),
                   ref_logps=-torch.rand(SEQUENCES, generator=g) * 20)
    tensors["targets"][::5] = -100
    tensors["seq_ids"] = torch.arange(SEQUENCES).repeat_interleave(LENGTH)
    for name in ("hidden", "weight"):
        tensors[name].requires_grad_()
    return tensors


def preference(x):
    loss, metrics = prefops.PreferenceLoss(["sigmoid", "sft"], loss_weights=[1.0, 0.5], token_metrics=True)(
        x["hidden"], x["weight"], x["targets"], seq_ids=x["seq_ids"], ref_chosen_logps=x["ref_logps"][:PAIRS],
        ref_rejected_logps=x["ref_logps"][PAIRS:])
    return loss, metrics


def tdpo(x):
    return prefops.PreferenceLoss("tdpo2")(x["hidden"], x["weight"], x["targets"], seq_ids=x["seq_ids"],
                                           ref_hidden=x["ref_hidden"], ref_weight=x["ref_weight"])


def listwise(x):
    lists = torch.arange(SEQUENCES).view(2, PAIRS)
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 2.0, 0.5, 3.0]])
    return prefops.ListwiseLoss("plackett_luce")(x["hidden"], x["weight"], x["targets"], lists=lists, scores=scores,
                                                 seq_ids=x["seq_ids"], ref_logps=x["ref_logps"])


def unpaired(x):
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    return prefops.UnpairedLoss("kto")(x["hidden"], x["weight"], x["targets"], labels=labels, seq_ids=x["seq_ids"],
                                       ref_logps=x["ref_logps"], kl=0.3)


def logprobs(x):
    logp = prefops.linear_logprobs(x["hidden"], x["weight"], x["targets"])
    return prefops.sequence_sum(logp, x["targets"] != -100, seq_ids=x["seq_ids"]).square().sum(), {}


def token_kl(x):
    kl = prefops.linear_token_kl(x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], targets=x["targets"]).kl
    return prefops.sequence_sum(kl, x["targets"] != -100, seq_ids=x["seq_ids"]).square().sum(), {}


FAMILIES = {"preference": (preference, PATHS), "tdpo": (tdpo, PATHS), "listwise": (listwise, PATHS),
            "unpaired": (unpaired, UNPAIRED_PATHS), "linear_logprobs": (logprobs, TOKEN_PATHS),
            "token_kl": (token_kl, TOKEN_PATHS)}
CASES = [(family, path) for family, (_, paths) in FAMILIES.items() for path in paths]


def run(family, path, deterministic):
    """(every value, metric and gradient of one call, the path it ran) on fresh inputs."""
    fn, paths = FAMILIES[family]
    x = inputs(0)
    with prefops.settings(**paths[path], deterministic=deterministic):
        loss, metrics = fn(x)
        ran = strategy.last_path()
        loss.backward()
    values = {"loss": loss.detach(), **{name: torch.as_tensor(value).detach() for name, value in metrics.items()}}
    return {**values, "h.grad": x["hidden"].grad, "W.grad": x["weight"].grad}, ran


def differing(first, second):
    assert set(first) == set(second)
    return [name for name in first if not torch.equal(first[name], second[name])]


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("family,path", CASES)
def test_two_runs_are_bitwise_equal(family, path, deterministic):
    first, ran = run(family, path, deterministic)
    second, _ = run(family, path, deterministic)
    assert ran == path
    assert all(value.abs().max() > 0 for name, value in first.items() if name.endswith("grad"))
    assert differing(first, second) == []


@pytest.mark.parametrize("family,path", [(family, "chunked" if "chunked" in paths else "lean")
                                         for family, (_, paths) in FAMILIES.items()])
def test_deterministic_mode_gives_the_default_values(family, path):
    """The sorted sums and the fixed kernel configuration compute the same quantities: within the
    rounding of fp32 sums over a sequence's tokens (here they even add in the same order)."""
    default, _ = run(family, path, False)
    deterministic, _ = run(family, path, True)
    for name, value in default.items():
        assert_fp32_close(deterministic[name], value, SEQUENCES * LENGTH, name)


def test_torch_deterministic_algorithms_switch_it_on():
    assert not prefops.determinism.enabled()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert prefops.determinism.enabled()
    finally:
        torch.use_deterministic_algorithms(previous)
    with prefops.settings(deterministic=True):
        assert prefops.determinism.enabled()
    with pytest.raises(TypeError, match="deterministic must be True or False"):
        prefops.configure(deterministic="yes")


def test_a_shuffled_accumulation_is_caught(monkeypatch):
    """The planted bug: per-sequence sums that add their terms in a new order each run."""
    real = prefops.determinism.index_add

    def shuffled(target, index, source):
        order = torch.randperm(index.numel())
        return real(target, index[order], source[order])

    for module in (prefops.chunks, prefops.per_sequence, prefops.sequences):
        monkeypatch.setattr(module, "index_add", shuffled)
    torch.manual_seed(0)
    first, _ = run("preference", "stored", True)
    second, _ = run("preference", "stored", True)
    assert differing(first, second)
