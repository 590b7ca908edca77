"""sequence_objective's budget strategy on both backends (the Triton row kernels run under the
interpreter on CPU) against lean and a float64 reference, with bias, temperature, softcap and
large-magnitude logits."""
import pytest
import torch

import prefops
from conftest import TOLERANCE, relative_error
from helpers import make_inputs
from prefops import tiles

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


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("transform", [{}, {"temperature": 0.7}, {"softcap": 15.0}], ids=str)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 4.0), (torch.float32, 100.0), (torch.bfloat16, 4.0)])
def test_budget_matches_float64(backend, transform, dtype, scale):
    hidden, weight, targets, bias, groups = problem(dtype, scale, bias=True)
    budget = 2 * LENGTH * VOCAB * 4  # one pair per chunk: several chunks
    with _no_fallback():
        loss, grads = run(hidden, weight, targets, bias, groups, strategy="budget", budget=budget, backend=backend,
                          **transform)
    leaves = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    token = prefops.reference.linear_logprobs(*leaves[:2], targets, bias=leaves[2], **transform)
    expected = head(token.sum(1)[groups], None, None)
    expected_grads = torch.autograd.grad(expected, leaves)
    # Logits of a few hundred are only known to their fp32 ulp (~3e-5), which bounds the agreement
    # of p and so of the gradients with float64 (as in test_linear_logprobs' magnitude test).
    tolerance = TOLERANCE[dtype] if scale < 10 else 1e-4
    assert relative_error(loss, expected) <= tolerance
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
def test_row_kernels_match_tile_math(softcap):
    from prefops.kernels import launch_rows_grad, launch_rows_stats

    n, vocab = 7, 5003  # more than one vocabulary block, odd length
    logits = torch.randn(n, vocab, dtype=torch.float64) * 50
    logits[0, :] = -1e4  # a row far below zero: the shifted statistics must not cancel
    targets = torch.randint(0, vocab, (n,), dtype=torch.int32)
    z = tiles.transform(logits, 0.9, softcap).double()
    want = tiles.finalize(tiles.tile_stats(z, targets.long()))
    got = tiles.finalize(launch_rows_stats(logits.float(), targets, 0.9, softcap))
    for name, value, expected in zip(want._fields, got, want):
        assert relative_error(value, expected) <= 1e-5, name
    grad_logp, grad_lse = torch.randn(n), torch.randn(n)
    expected_grad = tiles.tile_grad(z, targets.long(), want.lse, None, grad_logp.double(), grad_lse.double(), None,
                                    0.9, softcap)
    grad = launch_rows_grad(logits.float(), targets, got.lse, grad_logp, grad_lse, 0.9, softcap)
    assert relative_error(grad, expected_grad) <= 1e-5
