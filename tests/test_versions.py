"""Version combinations the package cannot run on are named before they fail obscurely."""
import numpy
import pytest
import triton

from prefops.fused import check_interpreter_versions


@pytest.mark.parametrize("triton_version,numpy_version,fails", [
    ("3.6.0", "2.4.1", True),   # the GPU box's triton with a current numpy: every interpreted launch fails
    ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.1", False),
    ("3.9.0", "3.0.0", False),
])
def test_interpreter_version_guard(monkeypatch, triton_version, numpy_version, fails):
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    if fails:
        with pytest.raises(RuntimeError, match=r"numpy<2.4.*triton>=3.7"):
            check_interpreter_versions()
    else:
        check_interpreter_versions()


def test_this_environment_passes_the_guard():
    check_interpreter_versions()
