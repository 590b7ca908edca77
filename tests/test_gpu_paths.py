"""Every path of prefops.strategy on CUDA at a GPU vocabulary (V 128256: several Triton vocabulary
splits, cuBLAS slices, partial last tiles), in bf16 and fp16, with softcap, against float64 of the
same inputs; and two runs of each path give bitwise-equal values and gradients.

`pytest -m gpu tests` runs these (skipped without CUDA); the CPU suite covers the same paths at
interpreter shapes (tests/test_paths.py)."""
import pytest
import torch

import prefops
from conftest import grad_tolerance, relative_error, value_tolerance
from helpers import make_inputs, reference64, run_with_grads
from prefops import strategy

pytestmark = pytest.mark.gpu

ROWS, HIDDEN, VOCAB = 1031, 512, 128_256
PAIRS, LENGTH = 4, 160
# A workspace that cuts the sliced path into several vocabulary slices at this shape.
SLICED_WORKSPACE = 256 << 20
DEVICE = "cuda"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["lean", "sliced"])
def test_token_op_paths_match_float64(path, dtype):
    hidden, weight, targets, bias = make_inputs(ROWS, HIDDEN, VOCAB, dtype=dtype, scale=4.0, bias=True, device=DEVICE)
    upstream = [torch.randn(ROWS, dtype=torch.float64, device=DEVICE) for _ in range(2)]
    options = dict(return_lse=True, softcap=30.0)
    with prefops.settings(strategy=path, workspace=SLICED_WORKSPACE):
        actual, actual_grads = run_with_grads(prefops.linear_logprobs, hidden, weight, bias, targets, upstream,
                                              **options)
        assert strategy.last_path() == path
        again, again_grads = run_with_grads(prefops.linear_logprobs, hidden, weight, bias, targets, upstream,
                                            **options)
    expected, expected_grads, sizes, logit_size = reference64(hidden, weight, bias, targets, upstream, **options)
    for a, e in zip(actual, expected):
        assert relative_error(a, e) <= value_tolerance(HIDDEN, VOCAB)
    limit = grad_tolerance(dtype, HIDDEN, VOCAB, ROWS, logit_size)
    for a, e, size in zip(actual_grads, expected_grads, sizes):
        assert relative_error(a, e, scale=size) <= limit
    for first, second in zip(actual + actual_grads, again + again_grads):
        assert torch.equal(first, second), "two runs of one path differ"


def dpo_head(logps, group_index, stats):
    return -torch.nn.functional.logsigmoid(0.1 * (logps[:, 0] - logps[:, 1])).sum() / PAIRS


def float64_dpo(hidden, weight, targets, groups):
    """Loss and gradients from the definitions, in float64 on the GPU."""
    h, w = (x.detach().double().requires_grad_() for x in (hidden, weight))
    logp = torch.log_softmax(h @ w.t(), -1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    loss = dpo_head(torch.where(targets != -100, logp, 0.0).sum(1)[groups], None, None)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["stored", "chunked", "sliced", "lean"])
def test_group_paths_match_float64_and_repeat_bitwise(path, dtype):
    hidden, weight, targets, _ = make_inputs(2 * PAIRS * LENGTH, HIDDEN, VOCAB, dtype=dtype, scale=4.0,
                                             ignore_every=5, device=DEVICE)
    hidden, targets = hidden.view(2 * PAIRS, LENGTH, HIDDEN), targets.view(2 * PAIRS, LENGTH)
    groups = torch.stack([torch.arange(PAIRS), torch.arange(PAIRS) + PAIRS], 1).to(DEVICE)
    pair_bytes = 2 * LENGTH * VOCAB * 6
    # stored: 2 GiB holds everything; chunked: a pair and its tile, not every gradient; sliced: not a pair.
    settings = {"stored": {}, "chunked": {"workspace": pair_bytes}, "sliced": {"workspace": pair_bytes // 2},
                "lean": {"strategy": "lean"}}[path]
    runs = []
    for _ in range(2):
        leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight)]
        with prefops.settings(**settings):
            out = prefops.sequence_objective(leaves[0], leaves[1], targets, head=dpo_head, groups=groups)
            assert strategy.last_path() == path
        runs.append((out.loss.detach(), *torch.autograd.grad(out.loss, leaves)))
    expected = float64_dpo(hidden, weight, targets, groups)
    assert relative_error(runs[0][0], expected[0]) <= 1e-5
    unit = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    for got, want in zip(runs[0][1:], expected[1:]):
        # the gradient tile and the stored gradient, each rounded once, plus a chunked dW's per-chunk roundings
        assert relative_error(got, want) <= (3 + PAIRS) * unit
    for first, second in zip(*runs):
        assert torch.equal(first, second), "two runs of one path differ"
