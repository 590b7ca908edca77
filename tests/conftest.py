import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter; triton reads this
# when a kernel is defined, so it must be set before prefops.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def relative_error(actual, expected, scale=None):
    """||actual - expected|| / ||scale|| in float64 (scale defaults to expected); NaN anywhere gives inf.

    Pass `scale` for a difference of larger terms (a margin of two rewards): its error
    is set by the size of the terms, not by the small difference."""
    actual, expected = actual.double(), expected.double()
    if torch.isnan(actual).any() or torch.isnan(expected).any():
        return float("inf")
    scale = expected if scale is None else scale.double()
    return ((actual - expected).norm() / scale.norm().clamp_min(1e-30)).item()


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
