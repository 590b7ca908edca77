"""sequence_objective's budget strategy on both backends (the Triton row kernels run under the
interpreter on CPU) against lean and a float64 reference, with bias, temperature, softcap and
large-magnitude logits."""
import pytest
import torch

import prefops
from conftest import relative_error
from helpers import make_inputs
from prefops import tiles
from prefops.chunks import budget_bytes_per_logit

PAIRS, LENGTH, HIDDEN, VOCAB = 3, 10, 23, 331
BETA = 0.1


def head(logps, group_index, stats):
    return -torch.nn.functional.logsigmoid(BETA * (logps[:, 0] - logps[:, 1])).sum() / PAIRS


def problem(dtype, scale, bias):
    hidden, weight, targets, b = make_inputs(2 * PAIRS * LENGTH, HIDDEN, VOCAB, dtype=dtype, scale=scale, bias=bias,
                                             ignore_every=3)
    groups = torch.stack([torch.arange(PAIRS), torch.arange(PAIRS) + PAIRS], 1)
    return hidden.view(2 * PAIRS, LENGTH, HIDDEN), weight, targets.view(2 * PAIRS, LENGTH), b, groups


def run(hidden, weight, targets, bias, groups, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight) + ((bias,) if bias is not None else ())]
    out = prefops.sequence_objective(leaves[0], leaves[1], targets, head=head, groups=groups,
                                     bias=leaves[2] if bias is not None else None, **kwargs)
    return out.loss, torch.autograd.grad(out.loss, leaves)


def float64_pipeline(hidden, weight, bias, targets, groups, temperature=1.0, softcap=None):
    """Loss, gradients and the logit gradient G in float64, written from the definitions
    (z = softcap tanh((hW^T + b) / T / softcap), log_softmax, gather, per-sequence sum, head)."""
    leaves = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    linear = leaves[0] @ leaves[1].t() + leaves[2]
    linear.retain_grad()
    z = linear / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    counted = targets != -100
    logp = torch.log_softmax(z, -1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    loss = head(torch.where(counted, logp, 0.0).sum(1)[groups], None, None)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves], linear.grad


def bf16_store_error(backend):
    """Relative error of one fp32 -> bf16 store: 2^-8 rounding to nearest (GPU, torch), 2^-7 in
    Triton's CPU interpreter, which truncates."""
    return 2.0**-7 if backend == "triton" else 2.0**-8


def rounding_bound(logit_grad, hidden, weight, unit, roundings_h, roundings_w):
    """Normwise error bounds of (h.grad, W.grad) stored in bf16 by the error model: each rounding
    of a value built from the terms G_rv W_v (or G_rv h_r) errs by at most `unit` times the sum of
    their magnitudes, so the bound is unit * roundings * || |G| |W| || (|G|^T |h| for W), which
    stays meaningful where the terms cancel."""
    g, h, w = logit_grad.abs().flatten(0, -2), hidden.double().abs().flatten(0, -2), weight.double().abs()
    return unit * roundings_h * (g @ w).norm().item(), unit * roundings_w * (g.t() @ h).norm().item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("transform", [{}, {"temperature": 0.7}, {"softcap": 15.0}], ids=str)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 4.0), (torch.float32, 100.0), (torch.bfloat16, 4.0)])
def test_budget_matches_float64(backend, transform, dtype, scale):
    hidden, weight, targets, bias, groups = problem(dtype, scale, bias=True)
    budget = 2 * LENGTH * VOCAB * budget_bytes_per_logit(dtype)  # one pair per chunk: several chunks
    with _no_fallback():
        loss, grads = run(hidden, weight, targets, bias, groups, strategy="budget", budget=budget, backend=backend,
                          **transform)
    expected, expected_grads, logit_grad = float64_pipeline(hidden, weight, bias, targets, groups, **transform)
    # The loss comes from fp32 logits of the (rounded) inputs: fp32 accumulation error, whatever the
    # input dtype. Logits of a few hundred are only known to their fp32 ulp (~3e-5), which bounds
    # the agreement of p and so of loss and gradients with float64 (as in test_linear_logprobs).
    tolerance = 1e-5 if scale < 10 else 1e-4
    assert relative_error(loss, expected) <= tolerance
    if dtype == torch.bfloat16:
        # h.grad: the bf16 gradient tile, then the GEMM's output. W.grad: the tile, then one rounding
        # of the bf16 accumulator per chunk (PAIRS chunks). The bias gradient sums in fp32.
        bound_h, bound_w = rounding_bound(logit_grad, hidden, weight, bf16_store_error(backend), 2, 1 + PAIRS)
        assert (grads[0].double() - expected_grads[0]).norm() <= bound_h
        assert (grads[1].double() - expected_grads[1]).norm() <= bound_w
        assert relative_error(grads[2], expected_grads[2]) <= bf16_store_error(backend)
        return
    for grad, want in zip(grads, expected_grads):
        assert relative_error(grad, want) <= tolerance


def _no_fallback():
    import warnings

    catcher = warnings.catch_warnings()

    class Strict:
        def __enter__(self):
            catcher.__enter__()
            warnings.simplefilter("error", UserWarning)

        def __exit__(self, *exc):
            return catcher.__exit__(*exc)

    return Strict()


@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_row_kernels_match_float64(softcap, out_dtype):
    """The budget strategy's row kernels on fp32 logits, against float64 from the definitions."""
    from prefops.kernels.rows_grad import launch_rows_grad
    from prefops.kernels.rows_stats import launch_rows_stats

    n, vocab, temperature = 7, 5003, 0.9  # more than one vocabulary block, odd length
    logits = torch.randn(n, vocab) * 50
    logits[0, :] -= 1e4  # a row far below zero: the shifted statistics must not cancel
    targets = torch.randint(0, vocab, (n,), dtype=torch.int32)
    z64 = logits.double().requires_grad_()
    z = z64 / temperature if softcap is None else softcap * torch.tanh(z64 / temperature / softcap)
    log_p = torch.log_softmax(z, -1)
    logp = log_p.gather(1, targets.long()[:, None]).squeeze(1)
    lse = torch.logsumexp(z, -1)
    got = tiles.finalize(launch_rows_stats(logits, targets, temperature, softcap))
    # Logits of ~50 are known to their fp32 ulp (4e-6), which bounds every statistic's agreement.
    for name, value, expected in [("logp", got.logp, logp), ("lse", got.lse, lse),
                                  ("entropy", got.entropy, -(log_p.exp() * log_p).sum(-1)),
                                  ("sum_p2", got.sum_p2, (2 * log_p).exp().sum(-1))]:
        assert relative_error(value, expected.detach(), scale=lse.detach()) <= 1e-5, name
    grad_logp, grad_lse = torch.randn(n), torch.randn(n)
    (grad_logp.double() * logp + grad_lse.double() * lse).sum().backward()
    out = logits.clone() if out_dtype == torch.float32 else torch.empty(n, vocab, dtype=out_dtype)
    grad = launch_rows_grad(logits.clone(), out, targets, got.lse, grad_logp, grad_lse, temperature, softcap)
    assert grad is out
    # The lse the kernel is given is fp32: off by up to 2^-24 |lse|, which shifts every p of its row
    # by that relative amount (~1e-3 in the row near -1e4); the stored gradient adds its own rounding.
    # Logits of ~50 under a softcap of 20 saturate the tanh: the slope 1 - t^2 must keep its relative
    # accuracy there (formed as 1 - t^2 in fp32 it lost up to 2e-4 of these rows' gradients).
    store = 2.0**-24 if out_dtype == torch.float32 else bf16_store_error("triton")
    for r in range(n):
        assert relative_error(grad[r], z64.grad[r]) <= 1e-5 + store + 4 * 2.0**-24 * abs(got.lse[r].item()), r


def test_row_kernels_ignore_a_target_beyond_the_row():
    """A sliced path hands each slice its targets shifted by the slice's first column: a target of a
    later slice lies beyond the row and may equal the offset of a masked lane of the last block
    (300 columns in blocks of 512 here). It must pick nothing, not the masked lane's -1e38 (seen on
    an H200, 2026-12-04: log-probs of -1e38 at V 128256)."""
    from prefops.kernels.rows_kl import launch_rows_kl_stats
    from prefops.kernels.rows_stats import launch_rows_stats

    logits = torch.randn(3, 300)
    targets = torch.tensor([400, 299, -5], dtype=torch.int32)
    stats = launch_rows_stats(logits, targets, 1.0, None)
    assert stats.target.tolist() == [0.0, logits[1, 299].item(), 0.0]
    kl = launch_rows_kl_stats(logits, logits.flip(1), targets, True, 1.0, None)
    assert kl.a_target.tolist() == [0.0, logits[1, 299].item(), 0.0]
    assert kl.b_target.tolist() == [0.0, logits[1, 0].item(), 0.0]
