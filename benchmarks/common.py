"""Timing, memory and reporting helpers shared by the benchmark scripts.

Everything takes a torch.device so a script can also run on CPU as a smoke
test: wall-clock timing there, and no memory figures (None).
"""
from __future__ import annotations

import datetime
import gc
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch


class Skipped(Exception):
    """A row that cannot run here (missing API or package); the message says why."""


def attempt(fn):
    """Run fn() and return (result, None), or (None, reason) when it cannot run.

    A benchmark run is often done blind on a borrowed GPU, so one broken row
    must never cost the others: every failure becomes a reason in the table,
    and unexpected ones also print their traceback.
    """
    try:
        return fn(), None
    except Skipped as error:
        return None, f"skipped: {error}"
    except ImportError as error:
        return None, f"skipped: {error}"
    except Exception as error:  # noqa: BLE001 - reported, never swallowed silently
        if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower():
            return None, "skipped: out of memory"
        traceback.print_exc(file=sys.stderr)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return None, f"failed: {type(error).__name__}: {first_line[:160]}"
    finally:
        free_memory()


def free_memory() -> None:
    # Compiled graphs (torch.compile rows, Liger's compiled chunks) would
    # otherwise pile up across rows and shapes.
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def median_ms(fn, *, device: torch.device, reps: int, warmup: int, before=None) -> float:
    """Median time of fn() in milliseconds; before() runs untimed ahead of every call.

    CUDA events time each call on the GPU without a host sync between reps,
    so back-to-back reps keep the GPU as busy as a training loop would.
    """
    before = before or (lambda: None)
    for _ in range(warmup):
        before()
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = []
        for _ in range(reps):
            before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(reps):
            before()
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def peak_during(fn, *, device: torch.device):
    """Return (fn(), peak bytes allocated during fn beyond those allocated before it).

    The bytes are None off CUDA, where the caching allocator's counters do not exist.
    """
    if device.type != "cuda":
        return fn(), None
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - before


def relative_error(value, expected) -> float:
    """||value - expected|| / ||expected||, accumulated in fp32 without an fp32 copy of either."""
    diff = torch.linalg.vector_norm(value.detach() - expected.detach(), dtype=torch.float32)
    return float(diff / torch.linalg.vector_norm(expected.detach(), dtype=torch.float32))


def environment_line(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cuda = torch.version.cuda or "?"
    else:
        name, cuda = "CPU", "n/a"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        commit = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"device: {name} | torch {torch.__version__} | triton {triton_version} | CUDA {cuda} | "
            f"prefops commit {commit} | {date}")


def markdown_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
