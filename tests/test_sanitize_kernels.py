"""benchmarks/sanitize_kernels.py, what compute-sanitizer runs on a GPU, launches every kernel and
path on CPU too (under the interpreter), so a GPU session finds it working."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_kernel_and_path_runs_under_the_interpreter():
    result = subprocess.run([sys.executable, "benchmarks/sanitize_kernels.py", "--device", "cpu"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:-1] == [
        "linear_logprobs: lean", "linear_token_kl: lean", "linear_logprobs: sliced", "linear_token_kl: sliced",
        "sequence_objective: stored", "sequence_objective: chunked", "linear_diagnostics: top-k"]
