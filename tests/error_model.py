"""Tolerances for comparing two fp32 computations of the same quantity, from an error model.

Two fp32 evaluations of a sum of `terms` terms (in another order: across ranks, micro-batches,
chunks, or through another kernel) differ by at most about 2 * terms * u * sum_i |term_i|,
u = 2^-24; random orders make it sqrt(terms) in practice, so the bound keeps a margin of
sqrt(terms) for the worst case without being loose. Without the terms themselves,
sum_i |term_i| of any element is bounded by the largest magnitude the tensor reaches: an element
that cancels to near 0 still carries the rounding of its large terms, which a relative
tolerance alone, or an absolute one fixed once (1e-7), does not allow for. A real bug (a missing
token, a wrong scale, a term counted twice) moves results by far more: 1/terms of the scale or more.
"""
import torch

FP32_UNIT = 2.0**-24


def fp32_tolerance(expected: torch.Tensor, terms: int, scale: float | None = None) -> dict:
    """rtol and atol for torch.testing.assert_close of fp32 results summed over `terms` terms.

    scale: the magnitude of the terms, where the tensor does not show it (a scalar metric that
    is a difference of larger sums); default the tensor's largest magnitude."""
    relative = 2 * terms * FP32_UNIT
    if scale is None:
        scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    return {"rtol": relative, "atol": relative * scale}


def assert_fp32_close(actual, expected, terms: int, name: str = "", scale: float | None = None) -> None:
    torch.testing.assert_close(actual, expected, **fp32_tolerance(expected, terms, scale),
                               msg=lambda message: f"{name}: {message}")


def assert_records_close(actual: dict, expected: dict, terms: int) -> None:
    """Scalar metrics of one step (log-prob sums, rewards and their differences): each is formed
    from terms no larger than the record's largest value."""
    assert set(actual) == set(expected)
    scale = max(abs(float(value)) for value in expected.values())
    for name, value in expected.items():
        assert_fp32_close(torch.tensor(float(actual[name])), torch.tensor(float(value)), terms, name, scale)
