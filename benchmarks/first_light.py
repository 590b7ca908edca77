"""First light on a GPU: the phases behind benchmarks/first_light.sh, one process each.

    python benchmarks/first_light.py env|smoke|core|peers|families|sweep|training --out DIR
                                     [--device cpu --tiny] [--deadline EPOCH]
    python benchmarks/first_light.py summary --out DIR

Every phase appends one JSON record per check, row or op to DIR/results.jsonl as
soon as it has it, so a phase stopped by its time limit keeps what it finished;
`summary` turns the records into DIR/summary.md with each of issue 20's bars
passed, failed or not run. Rows and ops are prefops.tools.bench's (the machinery
of bench_core.py and `prefops bench`), on bench_core.py's shapes A, Q and L; the
families are bench_tdpo.py's, bench_listwise.py's and bench_losses.py's, the
kernel sweep kernel_sweep.py's and the training rows bench_training.py's. With
--deadline (seconds since the epoch) a step starts only when the time it usually
needs is left.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

GIB = 1 << 30
U32 = 2.0 ** -24
BF16_UNIT = 2.0 ** -8

# Issue 20's bars. Fwd+bwd rows: (row key, shapes, at most x floor, at most GiB beyond the gradients).
ROW_BARS = (("default", "AQ", 1.15, 2.0), ("default", "L", 1.45, 2.0), ("lean", "AQL", 1.45, 0.25))
FORWARD_BAR = ("AQL", 1.10)  # prefops forward over one GEMM over the counted tokens
# Families at A: (family, row key, at most x its floor, what the bar says).
FAMILY_BARS = (("tdpo", "default", 1.6, "TDPO2 default <= 1.6x its 4-GEMM floor"),
               ("listwise", "default", 1.20, "listwise (2x4x1024) default <= 1.2x floor"))
HEAD_LOSS, HEAD_BAR = "sigmoid", 0.03  # one pairwise head over its logps-only row (bench_losses.py has the rest)
# 1B step: prefops tokens/s over TRL's and naive's at least these, and its step peak at most TRL's.
TRAINING_BARS = (("trl", 1.03), ("naive", 1.08))
# The rows at each shape, most wanted first (budget at L: a pair of 21k tokens exceeds 1 GB).
CORE_ROWS = {"default": "ALQ", "lean": "ALQ", "naive": "ALQ", "budget": "AQ"}
PEER_ROWS = ("trl", "liger", "cce", "compile")  # most wanted first; torch.compile's own compile is the longest
FAMILY_ROWS = {"tdpo": ("default",), "listwise": ("default",), "head": ("logps-default", "default")}
TRAINING_ROWS = ("prefops", "trl", "naive")
FORWARD_BASE = "one GEMM, counted tokens"
CORE_FORWARD = (FORWARD_BASE, "prefops forward (linear_logprobs, no_grad)")
PEER_FORWARD = (FORWARD_BASE, "TRL forward (logps)", "CCE forward (logps)")
SWEEP_SECONDS = 60  # the kernel sweep at A; benchmarks/kernel_sweep.py alone takes every shape in 3 minutes
# Seconds a step usually needs on an H100/H200 (first compile and tune included): a step starts
# only with this much left before the deadline.
NEEDS = {"shape": 15, "naive": 10, "default": 30, "lean": 40, "budget": 20, "forward": 10,
         "trl": 25, "liger": 60, "cce": 60, "compile": 90, "tdpo": 40, "listwise": 40, "head": 50, "sweep": 20,
         "training": 45}


def shapes(tiny: bool) -> dict:
    from bench_core import SHAPES
    from prefops.tools.bench import Shape
    if not tiny:
        return SHAPES
    # Under the CPU interpreter: small, and H, V and the batch layout still differ between shapes.
    return {"A": Shape(pairs=2, tokens=32, hidden=64, vocab=512), "Q": Shape(pairs=2, tokens=16, hidden=48, vocab=600),
            "L": Shape(pairs=1, tokens=96, hidden=64, vocab=512)}


class Log:
    """Appends records to results.jsonl (flushed at once) and echoes them to stdout."""

    def __init__(self, out: Path, phase: str):
        self.path, self.phase = out / "results.jsonl", phase

    def __call__(self, **record) -> dict:
        record = {"phase": self.phase, **record}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(" | ".join(f"{k}={v}" for k, v in record.items()), flush=True)
        return record


OUT_OF_TIME = "skipped: out of time"


def left(args) -> float:
    return math.inf if args.deadline is None else args.deadline - time.time()


def out_of_time(args, step: str):
    """None when `step` fits before the deadline, else the reason it is skipped."""
    if left(args) >= NEEDS[step]:
        return None
    return f"{OUT_OF_TIME} ({max(left(args), 0):.0f} s left, {step} needs ~{NEEDS[step]} s)"


# ---------------------------------------------------------------- env

def env(args, log):
    """What Triton needs before its first launch, and the versions the figures depend on."""
    log(check="python", ok=True, detail=f"{platform.python_version()} at {sys.executable}")
    compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    log(check="C compiler", ok=compiler is not None,
        detail=first_line(run([compiler, "--version"])) if compiler else "no cc, gcc or clang on PATH")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    log(check="Python.h", ok=header.is_file(), detail=str(header))
    import torch
    log(check="torch", ok=True, detail=f"{torch.__version__}, CUDA {torch.version.cuda}")
    try:
        import triton
        log(check="triton", ok=True, detail=triton.__version__)
    except ImportError as error:
        log(check="triton", ok=False, detail=str(error))
    if args.device == "cuda":
        available = torch.cuda.is_available()
        props = torch.cuda.get_device_properties(0) if available else None
        log(check="GPU", ok=available, detail=(f"{props.name}, sm_{props.major}{props.minor}, "
                                                f"{props.multi_processor_count} SMs, {props.total_memory / GIB:.0f} GiB"
                                                if props else "torch sees no CUDA device"))
        log(check="driver", ok=None, detail=first_line(run(["nvidia-smi", "--query-gpu=name,driver_version,"
                                                             "clocks.sm,clocks.max.sm,temperature.gpu",
                                                             "--format=csv,noheader"])))
        try:
            from triton.backends.nvidia.driver import libcuda_dirs
            log(check="libcuda", ok=True, detail=", ".join(libcuda_dirs()))
        except Exception as error:  # noqa: BLE001 - Triton's own search, whatever it raises
            log(check="libcuda", ok=False, detail=f"{type(error).__name__}: {first_line(str(error))}")
    import prefops
    import prefops.kernels
    log(check="prefops", ok=True, detail=f"{Path(prefops.__file__).parent}, kernels from "
                                          f"{', '.join(prefops.kernels.__path__)} (not installed: PYTHONPATH)")
    from importlib.util import find_spec
    from prefops.config import get_settings
    recorded = "records" if find_spec("prefops.strategy") else "has no prefops.strategy: no record of"
    log(check="prefops settings", ok=None, detail=", ".join(f"{k}={v}" for k, v in
                                                            dataclasses.asdict(get_settings()).items())
        + f"; this prefops {recorded} the path each call ran")
    from importlib import metadata
    for name, module in (("trl", "trl.trainer.utils"), ("liger-kernel", "liger_kernel.chunked_loss"),
                         ("cut-cross-entropy", "cut_cross_entropy"), ("datasets", "datasets")):
        begin = time.perf_counter()
        try:
            __import__(module)
            detail = f"{metadata.version(name)}, import {module} {time.perf_counter() - begin:.1f} s"
            ok = True
        except Exception as error:  # noqa: BLE001 - a peer that cannot load is a skipped row, not a stop
            detail, ok = f"{type(error).__name__}: {first_line(str(error))}", False
        log(check=f"peer {name}", ok=ok, detail=detail)
    settings = {k: os.environ.get(k) for k in ("PREFOPS_AUTOTUNE", "TRITON_CACHE_AUTOTUNING", "TRITON_INTERPRET")}
    log(check="settings", ok=None, detail=", ".join(f"{k}={v}" for k, v in settings.items()))


def run(command) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"{type(error).__name__}: {error}"


def first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:200]


# ---------------------------------------------------------------- smoke

def value_limit(*lengths) -> float:
    """tests/conftest.py's error model: a value of the logits' size built in fp32 through sums of these
    lengths is off by 4 u32 (sqrt(H) + sqrt(V) + ...) normwise relative."""
    return 4 * U32 * sum(math.sqrt(n) for n in lengths)


def bf16_grad_limit(*lengths) -> float:
    """A bf16 gradient: its tile rounded to bf16 before the GEMMs and the result once more when stored,
    2 u (3 u under the CPU interpreter, which truncates), plus the fp32 part."""
    from prefops.kernels.config import interpreting
    return (3 if interpreting() else 2) * BF16_UNIT + value_limit(*lengths)


def smoke(args, log):
    import torch
    device = torch.device(args.device)
    for name, check in (("triton kernel", smoke_triton), ("out_dtype GEMM", smoke_gemm),
                        ("linear_logprobs", smoke_linear_logprobs), ("DPO default, lean and budget", smoke_dpo),
                        ("bitwise repeat", smoke_repeat)):
        begin = time.perf_counter()
        try:
            check(args, device, log)
        except Exception as error:  # noqa: BLE001 - recorded; the next check still runs
            import traceback
            traceback.print_exc()
            log(check=name, ok=False, detail=f"{type(error).__name__}: {first_line(str(error))}")
        print(f"[smoke] {name}: {time.perf_counter() - begin:.1f} s", flush=True)


def smoke_triton(args, device, log):
    """The first launch compiles Triton's C launcher (cc, Python.h, libcuda): its time is the fixed cost."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask),
                 mask=mask)

    x, y = torch.randn(1000, device=device), torch.randn(1000, device=device)
    out = torch.full_like(x, float("nan"))
    begin = time.perf_counter()
    add[(triton.cdiv(1000, 256),)](x, y, out, 1000, BLOCK=256)
    seconds = time.perf_counter() - begin
    log(check="triton kernel", ok=bool(torch.equal(out, x + y)), detail=f"x + y, first launch {seconds:.1f} s")


def smoke_gemm(args, device, log):
    """torch.mm(bf16, bf16, out_dtype=fp32), which the budget strategy's logits run on, against float64, and
    its time against the same GEMM writing bf16: fused.matmul_fp32 raises rather than falls back."""
    import torch
    from prefops.fused import matmul_fp32
    from prefops.tools.bench import median_ms, relative_error
    m, k, n = (64, 96, 80) if args.tiny else (8192, 4096, 8192)
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    if device.type == "cuda":
        try:
            direct = torch.mm(a, b, out_dtype=torch.float32)
        except Exception as error:  # noqa: BLE001 - the probe's answer
            log(check="out_dtype GEMM", ok=False, detail=f"torch.mm(..., out_dtype=torch.float32): "
                                                          f"{type(error).__name__}: {first_line(str(error))}")
            return
        error = relative_error(direct, a.double() @ b.double())
        times = {name: median_ms(fn, device=device, reps=20, warmup=3) for name, fn in (
            ("bf16 out", lambda: a @ b), ("fp32 out", lambda: torch.mm(a, b, out_dtype=torch.float32)),
            ("fp32 GEMM", lambda: a.float() @ b.float()))}
        ratio = times["fp32 out"] / times["bf16 out"]
        # Writing fp32 instead of bf16 adds 2 bytes an output element, a few % of this GEMM's time;
        # an fp32 GEMM behind it would take several times as long.
        log(check="out_dtype GEMM", ok=error <= value_limit(k) and ratio < 1.5,
            detail=f"rel err {error:.1e} (limit {value_limit(k):.1e}); {m}x{k}x{n}: "
                   + ", ".join(f"{name} {ms:.2f} ms" for name, ms in times.items())
                   + f"; fp32 out / bf16 out {ratio:.2f}")
    else:
        log(check="out_dtype GEMM", ok=None, detail="n/a off CUDA (CPU matmul has no out_dtype)")
    fused = matmul_fp32(a, b)
    error = relative_error(fused, a.double() @ b.double())
    log(check="fused.matmul_fp32", ok=fused.dtype == torch.float32 and error <= value_limit(k),
        detail=f"{fused.dtype}, rel err {error:.1e} (limit {value_limit(k):.1e})")


def smoke_linear_logprobs(args, device, log):
    """Values and gradients in bf16 against float64 of the same rounded inputs (prefops.tools.compare's
    harness), Triton kernels, bias, softcap and entropy on, at an aligned shape and an odd one."""
    import torch
    from prefops.ops import linear_logprobs
    from prefops.reference import linear_logprobs as reference
    from prefops.tools.compare import Entry, check

    def entry(n, hidden, vocab):
        def make(generator):
            targets = torch.randint(0, vocab, (n,), generator=generator)
            targets[::5] = -100
            return {"hidden": torch.randn(n, hidden, generator=generator, dtype=torch.float64),
                    "weight": torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) * 4 / hidden**0.5,
                    "bias": torch.randn(vocab, generator=generator, dtype=torch.float64), "targets": targets}

        def outputs(op):
            def run(hidden, weight, targets, bias):
                logp, _, entropy = op(hidden, weight, targets, bias=bias, softcap=30.0, return_entropy=True)
                return {"logp": logp, "entropy": entropy}
            return run

        def fused(hidden, weight, targets, bias):
            out = linear_logprobs(hidden, weight, targets, bias=bias, softcap=30.0, return_entropy=True)
            return {"logp": out.logp, "entropy": out.entropy}
        return Entry(f"{n}x{hidden}, V {vocab}", make, fused, outputs(reference), leaves=("hidden", "weight", "bias"))

    sizes = ((64, 64, 256), (21, 35, 203)) if args.tiny else ((2048, 1024, 16384), (1021, 1000, 10007))
    for kind, (n, hidden, vocab) in zip(("aligned", "odd"), sizes):
        result = check(entry(n, hidden, vocab), dtype=torch.bfloat16, device=device, backend="triton")
        limits = value_limit(hidden, vocab), bf16_grad_limit(hidden, vocab, n)
        log(check=f"linear_logprobs {kind}", ok=not result.error and result.value_error <= limits[0]
            and result.grad_error <= limits[1],
            detail=result.error or f"{n} tokens, H {hidden}, V {vocab}: values {result.value_error:.1e} "
                                   f"(limit {limits[0]:.1e}), grads {result.grad_error:.1e} (limit {limits[1]:.1e}), "
                                   f"worst {result.worst}, {result.seconds:.1f} s")


def smoke_dpo(args, device, log):
    """The default, lean and budget rows' DPO loss and gradients in bf16 against the fp32-logit reference.

    Per-token log-probs are off by value_limit(H, V) relative, at random; a sequence's sum by that times
    the norm of its token log-probs, and a pair's margin by sqrt(2) of it; |d loss / d margin| <= beta,
    and both sides err: the loss limit is 2 sqrt(2) beta value_limit max ||logp_seq|| / |loss|."""
    import torch
    from prefops.tools.bench import (BENCH_ROWS, BETA, Shape, last_path, make_problem, naive_token_logps,
                                     reference_outputs, relative_error, row_step)
    shape = (Shape(pairs=2, tokens=32, hidden=64, vocab=512) if args.tiny
             else Shape(pairs=2, tokens=512, hidden=1024, vocab=16384))
    p = make_problem(shape, device)
    expected = reference_outputs(p)
    with torch.no_grad():
        token_logps = naive_token_logps(p.hidden.float(), p.weight.float(), p.targets)
    sequence_norm = float(torch.linalg.vector_norm(token_logps, dim=-1).max())
    loss_limit = 2 * math.sqrt(2) * BETA * value_limit(shape.hidden, shape.vocab) * sequence_norm
    limits = (loss_limit / abs(float(expected[0])), *[bf16_grad_limit(shape.hidden, shape.vocab, shape.tokens)] * 2)
    for key in ("default", "lean", "budget"):
        p.clear_gradients()
        with warnings_as_notes() as notes:
            loss = row_step(BENCH_ROWS[key], p)()
        errors = [relative_error(a, e) for a, e in zip((loss, p.hidden.grad, p.weight.grad), expected)]
        log(check=f"DPO {key}", ok=not notes and all(e <= limit for e, limit in zip(errors, limits)),
            detail=", ".join(f"{name} {e:.1e} (limit {limit:.1e})"
                             for name, e, limit in zip(("loss", "dh", "dW"), errors, limits))
            + f"; path {last_path()}; {shape}" + "".join(f"; {note}" for note in notes))


def smoke_repeat(args, device, log):
    """Issue 22's first-light determinism check: two steps of the default, lean and budget rows on the same inputs
    give bitwise-equal loss and gradients in deterministic mode (prefops.determinism); the detail also says
    whether they did without it (CUDA's atomic per-sequence sums may add in another order)."""
    import torch
    from prefops import settings
    from prefops.tools.bench import BENCH_ROWS, Shape, make_problem, row_step

    shape = (Shape(pairs=2, tokens=32, hidden=64, vocab=512) if args.tiny
             else Shape(pairs=2, tokens=512, hidden=1024, vocab=16384))
    p = make_problem(shape, device)
    for deterministic in (True, False):
        found = []
        for key in ("default", "lean", "budget"):
            runs = []
            for _ in range(2):
                p.clear_gradients()
                with settings(deterministic=deterministic):
                    runs.append((row_step(BENCH_ROWS[key], p)(), p.hidden.grad.clone(), p.weight.grad.clone()))
            found.append((key, all(torch.equal(a, b) for a, b in zip(*runs))))
        detail = ", ".join(f"{key} {'equal' if equal else 'DIFFERS'}" for key, equal in found) + f"; {shape}"
        log(check=f"repeat {'deterministic' if deterministic else 'default'}",
            ok=all(equal for _, equal in found) or not deterministic, detail=detail)


@contextlib.contextmanager
def warnings_as_notes():
    """Collects the warnings a row raises (deprecations aside) into the yielded list: a budget row that
    fell back to lean must not pass as budget."""
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield notes
    notes += sorted({f"warning: {w.message}" for w in caught
                     if not issubclass(w.category, (DeprecationWarning, FutureWarning))})


# ---------------------------------------------------------------- core and peers

def bench_args(args):
    return argparse.Namespace(reps=1 if args.tiny else 20, warmup=0 if args.tiny else 3)


def row_record(row, result, reason, notes) -> dict:
    """The fields of a measured fwd+bwd row: time, bytes beyond the gradients, errors, the path a prefops row ran."""
    from prefops.tools.bench import last_path
    ms, beyond, errors = result or (None, None, None)
    return dict(label=row.label, ms=ms, beyond=beyond, errors=errors, reason=reason, notes=notes, note=row.note,
                path=last_path() if row.reports_path and result else None)


def bench_rows(args, log, name, shape, rows, forward):
    """Floor, then each row's fwd+bwd and each forward op at one shape, every one recorded when done."""
    import torch
    from prefops.tools import bench
    device, timing = torch.device(args.device), bench_args(args)
    reason = out_of_time(args, "shape")
    if reason:
        return log(shape=name, kind="shape", reason=reason)
    p = bench.make_problem(shape, device)
    floor_ms, reason = bench.attempt(lambda: bench.median_ms(bench.build_floor(p), device=device, reps=timing.reps,
                                                             warmup=timing.warmup))
    log(shape=name, kind="floor", ms=floor_ms, reason=reason, counted=int(p.mask.sum()), detail=str(shape))
    expected = {}
    for key in rows:
        row = bench.BENCH_ROWS[key]
        reason = out_of_time(args, key)
        if reason:
            log(shape=name, kind="row", row=key, label=row.label, reason=reason)
            continue
        problem = bench.row_problem(row, p)
        if row.zero_ref not in expected:
            expected[row.zero_ref], _ = bench.attempt(lambda: bench.reference_outputs(problem))
        with warnings_as_notes() as notes:
            result, reason = bench.attempt(lambda: bench.measure_row(row, problem, expected[row.zero_ref], device,
                                                                     timing, record_cpu=True))
        log(shape=name, kind="row", row=key, floor_ms=floor_ms, **row_record(row, result, reason, notes))
    ops = bench.forward_ops(p)
    base_ms = None
    for label in forward:
        reason = out_of_time(args, "forward")
        if not reason:
            ms, reason = bench.attempt(lambda: bench.median_ms(torch.no_grad()(ops[label]), device=device,
                                                               reps=timing.reps, warmup=timing.warmup))
        else:
            ms = None
        base_ms = ms if label == FORWARD_BASE else base_ms
        path = bench.last_path() if label.startswith("prefops") and ms else None
        log(shape=name, kind="forward", op=label, ms=ms, base_ms=base_ms, reason=reason, path=path)


def core(args, log):
    table = shapes(args.tiny)
    for name in "AQL":  # L last: the largest, and a timeout there still leaves A and Q
        rows = [key for key, where in CORE_ROWS.items() if name in where]
        bench_rows(args, log, name, table[name], rows, CORE_FORWARD)


def peers(args, log):
    rows = PEER_ROWS
    if args.tiny:  # the dry run's minutes: inductor's CPU compile alone takes ~20 s
        rows = [key for key in rows if key != "compile"]
        log(shape="A", kind="row", row="compile", label="torch.compile(naive)", reason="skipped: tiny dry run")
    bench_rows(args, log, "A", shapes(args.tiny)["A"], rows, PEER_FORWARD)


# ---------------------------------------------------------------- families at A, under the default strategy

def families(args, log):
    """TDPO2, listwise Plackett-Luce and one pairwise head, each with its floor, every record when made."""
    import torch
    from prefops.tools.bench import attempt
    device = torch.device(args.device)
    for family, run in (("tdpo", family_tdpo), ("listwise", family_listwise), ("head", family_head)):
        reason = out_of_time(args, family)
        if not reason:
            _, reason = attempt(lambda: run(args, device, log))
        if reason:  # in the family's rows, so that their bars say why
            for key in FAMILY_ROWS[family]:
                log(kind="family", family=family, row=key, label=key, reason=reason)


def timed_floor(build, p, device, timing):
    from prefops.tools.bench import attempt, median_ms
    return attempt(lambda: median_ms(build(p), device=device, reps=timing.reps, warmup=timing.warmup))


def family_tdpo(args, device, log):
    import bench_tdpo
    from prefops.tools.bench import attempt, last_path
    timing = bench_args(args)
    p = bench_tdpo.make_tdpo_problem(shapes(args.tiny)["A"], device)
    floor_ms, reason = timed_floor(bench_tdpo.build_floor, p, device, timing)
    log(kind="family", family="tdpo", row="floor", label="floor: 4 GEMMs over counted tokens", ms=floor_ms,
        reason=reason)
    expected, _ = attempt(lambda: bench_tdpo.reference_outputs(p))
    for key in FAMILY_ROWS["tdpo"]:
        label, build = bench_tdpo.ROWS[key]
        with warnings_as_notes() as notes:
            result, reason = attempt(lambda: bench_tdpo.measure(build, p, expected, device, timing))
        ms, beyond, errors = result or (None, None, None)
        log(kind="family", family="tdpo", row=key, label=label, ms=ms, floor_ms=floor_ms, beyond=beyond,
            errors=errors, reason=reason, notes=notes, path=last_path() if result else None)


def family_listwise(args, device, log):
    import bench_listwise
    from prefops.tools.bench import attempt, build_floor, measure_row
    timing = bench_args(args)
    p, scores = bench_listwise.make_lists_problem(bench_listwise.TINY_SHAPE if args.tiny else bench_listwise.SHAPE,
                                                  device)
    lists = bench_listwise.Lists(scores, "plackett_luce")
    floor_ms, reason = timed_floor(build_floor, p, device, timing)
    log(kind="family", family="listwise", row="floor", label="floor: 3 GEMMs over counted tokens", ms=floor_ms,
        reason=reason)
    expected, _ = attempt(lambda: bench_listwise.reference_outputs(p, lists))
    rows = bench_listwise.builders(lists)
    for key in FAMILY_ROWS["listwise"]:
        row = rows[key]
        with warnings_as_notes() as notes:
            result, reason = attempt(lambda: measure_row(row, p, expected, device, timing, record_cpu=True))
        log(kind="family", family="listwise", row=key, floor_ms=floor_ms, **row_record(row, result, reason, notes))


def family_head(args, device, log):
    """The loss head's cost: the PreferenceLoss row against sequence_objective with the trivial head, each
    timed alone so that each row's path is its own."""
    import bench_losses
    from prefops.tools.bench import build_floor, last_path, make_problem
    timing = bench_args(args)
    p = make_problem(shapes(args.tiny)["A"], device)
    floor_ms, reason = timed_floor(build_floor, p, device, timing)
    log(kind="family", family="head", row="floor", label="floor: 3 GEMMs over counted tokens", ms=floor_ms,
        reason=reason)
    for key in FAMILY_ROWS["head"]:
        with warnings_as_notes() as notes:
            (result,) = bench_losses.measure_loss_type(HEAD_LOSS, p, [key], device, timing)
        errors = None if result.errors is None else [f"{e:.1e}" for e in result.errors]
        log(kind="family", family="head", row=key, label=bench_losses.ROWS[key].label,
            note=f"loss_type {HEAD_LOSS!r}", ms=result.ms, floor_ms=floor_ms, beyond=result.beyond, errors=errors,
            reason=result.reason or None, notes=notes, path=last_path() if result.ms else None)


# ---------------------------------------------------------------- kernel sweep at A, and 1B training

def sweep(args, log):
    """kernel_sweep.py at A within SWEEP_SECONDS: every autotune config, the full list."""
    import kernel_sweep
    note = kernel_sweep.every_config()
    if note:
        log(kind="config", kernel="all", shape="A", config="all", reason=note)
    import torch
    deadline = min(time.time() + SWEEP_SECONDS, args.deadline or math.inf)
    kernel_sweep.sweep(torch.device(args.device), kernel_sweep.shapes(args.tiny), deadline=deadline,
                       reps=1 if args.tiny else 10, warmup=0 if args.tiny else 2, log=log, shape_names="A")


def training(args, log):
    """bench_training.py's throughput part at 4 pairs x 2048 (1B Llama): prefops' default, TRL, naive."""
    import bench_training
    import torch
    from prefops.tools.bench import attempt, last_path
    options = bench_training.parse_args(["--part", "throughput", "--device", args.device,
                                         *(["--tiny", "--reps", "1", "--warmup", "0"] if args.tiny
                                           else ["--reps", "5", "--warmup", "1"])])
    device = torch.device(args.device)
    for row in TRAINING_ROWS:
        reason = out_of_time(args, "training")
        if reason:
            log(kind="training", row=row, reason=reason)
            continue
        figures, reason = attempt(lambda: bench_training.step_figures(options, device, row))
        figures = figures or {}
        log(kind="training", row=row, batch=f"{options.pairs} x {options.seq_len}", ms=figures.get("ms"),
            tokens_per_s=figures.get("tokens_per_s"), step_peak=figures.get("step_peak"), loss=figures.get("loss"),
            reason=reason, path=last_path() if row == "prefops" and figures else None)


# ---------------------------------------------------------------- summary

MARK = {True: "ok", False: "FAIL", None: "—"}


def summary(args, log):
    """summary.md from results.jsonl: phases, checks, the bars, then every row, op, family, config and step."""
    records = [json.loads(line) for line in (args.out / "results.jsonl").read_text().splitlines() if line.strip()]
    lines = ["# First light" + (" (CPU DRY RUN, tiny shapes: timings and bars meaningless)" if args.tiny else ""), ""]
    lines += ["| phase | exit | seconds |", "|---|---|---|"]
    lines += [f"| {r['phase']} | {'timed out' if r['rc'] in (124, 137) else r['rc']} | {r['seconds']} |"
              for r in records if r.get("kind") == "phase"]
    lines += ["", "| check | | detail |", "|---|---|---|"]
    lines += [f"| {r['phase']}: {r['check']} | {MARK[r['ok']]} | {r['detail']} |" for r in records if "check" in r]
    bars = bar_lines(records)
    verdicts = [line[-1] for line in bars]
    lines += ["", "## Bars (issue 20)", "", "| bar | shape | measured | |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(line) + " |" for line in bars]
    lines += ["", "## Forward + backward", "",
              "| shape | row | ms | x floor | GB beyond grads | loss / dh / dW rel err | note |",
              "|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("kind") == "floor":
            lines.append(f"| {r['shape']} | floor: 3 GEMMs over {r['counted']} counted tokens | {fmt(r['ms'])} | "
                         f"1.00x | — | — | {r['reason'] or ''} |")
        elif r.get("kind") == "row":
            lines.append(f"| {r['shape']} | " + row_cells(r) + " |")
        elif r.get("kind") == "shape":
            lines.append(f"| {r['shape']} | (shape) | — | — | — | — | {r['reason']} |")
    lines += ["", "## Forward only", "", "| shape | op | ms | x one GEMM over counted tokens | note |",
              "|---|---|---|---|---|"]
    for r in records:
        if r.get("kind") == "forward":
            ratio = f"{r['ms'] / r['base_ms']:.2f}x" if r["ms"] and r["base_ms"] else "—"
            note = "; ".join(filter(None, [r["reason"], r.get("path") and f"path {r['path']}"]))
            lines.append(f"| {r['shape']} | {r['op']} | {fmt(r['ms'])} | {ratio} | {note} |")
    lines += ["", "## Families at A (default strategy)", "",
              "| family | row | ms | x floor | GB beyond grads | loss / dh / dW rel err | note |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['family']} | " + row_cells(r) + " |" for r in records if r.get("kind") == "family"]
    sweep_records = [r for r in records if r.get("phase") == "sweep" and r.get("kind") in ("cublas", "config")]
    lines += ["", "## Kernel sweep at A (benchmarks/kernel_sweep.py)", ""]
    if sweep_records:
        import kernel_sweep
        lines.append(kernel_sweep.markdown(sweep_records))
    else:
        lines.append("not run")
    lines += ["", "## 1B training throughput (bench_training.py --part throughput)", "",
              "| loss | batch | step ms | tokens/s | step peak GB | first-step loss | note |",
              "|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("kind") == "training":
            note = "; ".join(filter(None, [r.get("reason"), r.get("path") and f"path {r['path']}"]))
            lines.append(f"| {r['row']} | {r.get('batch', '—')} | {fmt(r.get('ms'))} | "
                         f"{'—' if r.get('tokens_per_s') is None else format(r['tokens_per_s'], ',.0f')} | "
                         f"{'—' if r.get('step_peak') is None else format(r['step_peak'] / GIB, '.2f')} | "
                         f"{'—' if r.get('loss') is None else format(r['loss'], '.5f')} | {note} |")
    lines += ["", f"Bars passed: {verdicts.count('pass')} of {len(verdicts)}; failed: {verdicts.count('FAIL')}; "
                  f"not run: {verdicts.count('not run')}."]
    text = "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(text)
    print(text, flush=True)


def row_cells(r) -> str:
    """label | ms | x floor | GB | errors | note of a fwd+bwd or family row (a family's floor: ratio 1)."""
    floor_ms = r.get("floor_ms") or (r.get("ms") if r.get("row") == "floor" else None)
    ratio = f"{r['ms'] / floor_ms:.2f}x" if r.get("ms") and floor_ms else "—"
    gb = "—" if r.get("beyond") is None else f"{r['beyond'] / GIB:.3g}"
    note = "; ".join(filter(None, [r.get("reason"), *r.get("notes", []), r.get("note"),
                                   r.get("path") and f"path {r['path']}"]))
    return f"{r['label']} | {fmt(r.get('ms'))} | {ratio} | {gb} | {' / '.join(r.get('errors') or ['—'])} | {note}"


def bar_lines(records) -> list:
    """[bar, shape, measured, pass / FAIL / not run] for every bar of issue 20, in its order."""
    rows = {(r["shape"], r["row"]): r for r in records if r.get("kind") == "row"}
    forward = {r["shape"]: r for r in records if r.get("kind") == "forward" and r["op"] == CORE_FORWARD[1]}
    family = {(r["family"], r["row"]): r for r in records if r.get("kind") == "family"}
    steps = {r["row"]: r for r in records if r.get("kind") == "training"}
    lines = []
    for key, where, ratio_bar, gib_bar in ROW_BARS:
        for shape in where:
            verdict, measured = bar_verdict(rows.get((shape, key)), ratio_bar, gib_bar)
            lines.append([f"{key} <= {ratio_bar}x floor, <= {gib_bar} GB", shape, measured, verdict])
    for shape in FORWARD_BAR[0]:
        op = forward.get(shape)
        if op is None:
            measured, verdict = "not run", "not run"
        elif not (op["ms"] and op["base_ms"]):
            measured, verdict = op["reason"] or "no time for one GEMM", "FAIL"
        else:
            ratio = op["ms"] / op["base_ms"]
            measured = f"{ratio:.2f}x ({op['ms']:.2f} / {op['base_ms']:.2f} ms)" + \
                (f", path {op['path']}" if op.get("path") else "")
            verdict = "pass" if ratio <= FORWARD_BAR[1] else "FAIL"
        lines.append([f"forward-only <= {FORWARD_BAR[1]}x one GEMM", shape, measured, verdict])
    for name, key, ratio_bar, text in FAMILY_BARS:
        lines.append([text, "A", *reversed(bar_verdict(family.get((name, key)), ratio_bar, None))])
    lines.append([f"pairwise head ({HEAD_LOSS}) default <= {HEAD_BAR:.0%} over logps-only", "A",
                  *head_verdict(family.get(("head", "default")), family.get(("head", "logps-default")))])
    for peer, ratio_bar in TRAINING_BARS:
        lines.append([f"1B tokens/s >= {ratio_bar}x {peer}", "4x2048",
                      *compare_verdict(steps.get("prefops"), steps.get(peer), "tokens_per_s", ratio_bar)])
    lines.append(["1B step peak <= trl's", "4x2048", *compare_verdict(steps.get("prefops"), steps.get("trl"),
                                                                      "step_peak", None)])
    return lines


def not_run(record) -> bool:
    """A row that never ran: none recorded, or skipped for lack of time (out of memory is a failure)."""
    return record is None or (record.get("ms") is None and (record.get("reason") or "").startswith(OUT_OF_TIME))


def bar_verdict(record, ratio_bar, gib_bar):
    """(pass / FAIL / not run, what was measured) of one fwd+bwd row against its bar; gib_bar None: time alone."""
    if not_run(record):
        return "not run", record.get("reason") if record else "not run"
    if record.get("ms") is None or not record.get("floor_ms"):
        return "FAIL", record.get("reason") or "no time"
    ratio = record["ms"] / record["floor_ms"]
    gib = None if record.get("beyond") is None else record["beyond"] / GIB
    measured = f"{ratio:.2f}x"
    ok = ratio <= ratio_bar and not record.get("notes")
    if gib_bar is not None:
        measured += ", " + ("memory n/a" if gib is None else f"{gib:.2f} GB")
        ok = ok and gib is not None and gib <= gib_bar
    measured += (f", path {record['path']}" if record.get("path") else "") + \
        "".join(f"; {note}" for note in record.get("notes", []))
    return ("pass" if ok else "FAIL"), measured


def head_verdict(head, logps):
    """(measured, verdict) of the head row's time over its logps-only row's."""
    if not_run(head) or not_run(logps):
        return (head or logps or {}).get("reason") or "not run", "not run"
    if not (head.get("ms") and logps.get("ms")):
        return head.get("reason") or logps.get("reason") or "no time", "FAIL"
    over = head["ms"] / logps["ms"] - 1
    paths = f", paths {logps.get('path')} / {head.get('path')}"
    notes = "".join(f"; {note}" for note in head.get("notes", []) + logps.get("notes", []))
    ok = over <= HEAD_BAR and not notes
    return f"{over:+.1%} ({head['ms']:.2f} / {logps['ms']:.2f} ms){paths}{notes}", "pass" if ok else "FAIL"


def compare_verdict(ours, peer, field, ratio_bar):
    """(measured, verdict) of prefops' training figure against a peer's: tokens/s at least ratio_bar x the peer's,
    or (ratio_bar None) a step peak no higher. A peer that did not run leaves the bar not run."""
    if not_run(ours):
        return ours.get("reason") if ours else "not run", "not run"
    if ours.get(field) is None:
        return ours.get("reason") or f"no {field}", "FAIL"
    if peer is None or peer.get(field) is None:
        return f"{peer['row']}: {peer.get('reason') or 'no figure'}" if peer else "peer not run", "not run"
    if ratio_bar is None:
        ok = ours[field] <= peer[field]
        return f"{ours[field] / GIB:.2f} / {peer[field] / GIB:.2f} GB", "pass" if ok else "FAIL"
    ratio = ours[field] / peer[field]
    return f"{ratio:.3f}x ({ours[field]:,.0f} / {peer[field]:,.0f})", "pass" if ratio >= ratio_bar else "FAIL"


def fmt(ms):
    return "—" if ms is None else f"{ms:.2f}"


PHASES = {"env": env, "smoke": smoke, "core": core, "peers": peers, "families": families, "sweep": sweep,
          "training": training, "summary": summary}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=PHASES)
    parser.add_argument("--out", type=Path, required=True, help="folder of results.jsonl and summary.md")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU dry run)")
    parser.add_argument("--deadline", type=float, help="seconds since the epoch by which the phase must be done")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase != "summary" and args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            Log(args.out, args.phase)(check="CUDA", ok=False, detail="torch sees no CUDA device; "
                                                                     "for a dry run: --device cpu --tiny")
            return 2
    PHASES[args.phase](args, Log(args.out, args.phase))
    return 0


if __name__ == "__main__":
    sys.exit(main())
