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
    # One op, no per-sequence scatter: two runs agree bitwise without torch's deterministic mode.
    for first, second in zip(actual + actual_grads, again + again_grads):
        assert torch.equal(first, second), "two runs of one path differ"


def dpo_head(logps, group_index, stats):
    return -torch.nn.functional.logsigmoid(BETA * (logps[:, 0] - logps[:, 1])).sum() / PAIRS


BETA = 0.1
GROUP_SETTINGS = {  # at PAIRS x LENGTH, V 128256: 2 GiB holds every logit gradient (stored); a pair and its
    # gradient tile, not every gradient (chunked); less than a pair (sliced); lean asked for.
    "stored": {}, "chunked": {"workspace": 2 * LENGTH * VOCAB * 6}, "sliced": {"workspace": LENGTH * VOCAB * 6},
    "lean": {"strategy": "lean"}}


def group_problem(dtype):
    hidden, weight, targets, _ = make_inputs(2 * PAIRS * LENGTH, HIDDEN, VOCAB, dtype=dtype, scale=4.0,
                                             ignore_every=5, seed=3, device=DEVICE)
    groups = torch.stack([torch.arange(PAIRS), torch.arange(PAIRS) + PAIRS], 1).to(DEVICE)
    return hidden.view(2 * PAIRS, LENGTH, HIDDEN), weight, targets.view(2 * PAIRS, LENGTH), groups


def run_group_path(path, hidden, weight, targets, groups):
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight)]
    with prefops.settings(**GROUP_SETTINGS[path]):
        out = prefops.sequence_objective(leaves[0], leaves[1], targets, head=dpo_head, groups=groups)
        assert strategy.last_path() == path
    return (out.loss.detach(), *torch.autograd.grad(out.loss, leaves))


def float64_dpo(hidden, weight, targets, groups):
    """Loss, gradients, the logit gradient and the magnitude of the sequence sums, from the
    definitions in float64 on the GPU."""
    h, w = (x.detach().double().requires_grad_() for x in (hidden, weight))
    linear = h @ w.t()
    linear.retain_grad()
    logp = torch.where(targets != -100, torch.log_softmax(linear, -1).gather(
        -1, targets.clamp_min(0)[..., None]).squeeze(-1), 0.0)
    loss = dpo_head(logp.sum(1)[groups], None, None)
    loss.backward()
    return loss.detach(), h.grad, w.grad, linear.grad, logp.abs().sum().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["stored", "chunked", "sliced", "lean"])
def test_group_paths_match_float64(path, dtype):
    hidden, weight, targets, groups = group_problem(dtype)
    loss, grad_h, grad_w = run_group_path(path, hidden, weight, targets, groups)
    want_loss, want_h, want_w, logit_grad, logp_size = float64_dpo(hidden, weight, targets, groups)
    # The loss is a sigmoid of BETA times a difference of sequence sums: each log-prob carries the
    # fp32 error of its logits and vocabulary sum, relative to the size of the sums it enters.
    assert abs(loss.item() - want_loss.item()) <= value_tolerance(HIDDEN, VOCAB, LENGTH) * BETA * logp_size / PAIRS
    # The gradient tile rounded once to the dtype, the stored gradient once more (h * grad_loss is
    # exact here); a chunked dW adds one rounding of its accumulator per chunk (a pair a chunk).
    unit = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    g, h64, w64 = logit_grad.abs().flatten(0, 1), hidden.double().abs().flatten(0, 1), weight.double().abs()
    roundings_w = {"chunked": 1 + PAIRS}.get(path, 2)
    assert (grad_h.double() - want_h).norm() <= 2 * unit * (g @ w64).norm()
    assert (grad_w.double() - want_w).norm() <= roundings_w * unit * (g.t() @ h64).norm()


@pytest.mark.parametrize("mode", ["prefops", "torch"])
@pytest.mark.parametrize("path", ["stored", "chunked", "sliced", "lean"])
def test_group_paths_repeat_bitwise(path, mode):
    """Per-sequence sums scatter with index_add, whose CUDA kernel adds atomically: deterministic mode,
    prefops.settings(deterministic=True) or torch's (warn_only: cuBLAS's own mode needs
    CUBLAS_WORKSPACE_CONFIG set before the first GEMM of the process), sums in sorted order instead and
    launches the kernels with one fixed configuration. stored is the default's path at this shape."""
    problem = group_problem(torch.bfloat16)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if mode == "torch":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with prefops.settings(deterministic=mode == "prefops"):
            first, second = (run_group_path(path, *problem) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for name, a, b in zip(("loss", "h.grad", "W.grad"), first, second):
        assert torch.equal(a, b), f"two runs of the {path} path differ in {name}"
