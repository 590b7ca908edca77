"""Every autotune config of each GEMM-fused Triton kernel against cuBLAS, at bench_core.py's shapes.

    python benchmarks/kernel_sweep.py --out sweep                      # one GPU, at most --seconds (180)
    python benchmarks/kernel_sweep.py --device cpu --tiny --out sweep  # dry run: TRITON_INTERPRET=1, 1 rep

The kernels are those of prefops.kernels with a BLOCK_K loop (a tl.dot over the hidden size), found
as tests/compile_for_hopper.py finds them. Each is launched through its own launch_* function once,
with the launch intercepted, so the sweep replays exactly the arguments and grid a real call passes;
then the raw @triton.jit function runs with every triton.Config of its autotuner (all of them: this
script sets PREFOPS_AUTOTUNE=full before the kernels are defined). Per config: the first launch
(compile, or a cache hit) timed apart, one launch into outputs poisoned with NaN, compared with the
first config's (every element written, the same values up to rounding), then the median of CUDA
events after warm-up, as a percentage of cuBLAS doing the same GEMMs over the same counted rows
(torch.mm in bf16, and in bf16 with out_dtype=torch.float32), and registers and spilled registers
from the compiled kernel.

Shapes: the counted rows of bench_core.py's A, Q and L (65% of the tokens), every kernel over the
whole vocabulary in one launch (the lean path launches the gradient kernels on workspace-sized tiles
of the same rows). Random data (never zeros: they run faster than real data). Kernels go in order of
PRIORITY, each at A, Q, L; a step starts only when the time it usually needs is left before
--seconds, and what is skipped says so. Writes kernel-sweep.md and kernel-sweep.jsonl to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import pkgutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The lean path's forward and recompute first: the kernels issue 20 item 5 sets a bar for.
PRIORITY = ("logits_stats_kernel", "logits_grad_kernel")
OUTPUT_PARAMS = ("out_ptr", "top_ptr", "top_ids_ptr")
# Seconds a first launch may take to compile a config before any was measured (an H100 compiles
# one of these in a few seconds), and launches a timed config makes besides its reps.
COMPILE_GUESS = 10.0
EXTRA_LAUNCHES = 2
REPS, WARMUP = (10, 1), (2, 0)  # on CUDA, on CPU
HEADERS = ["kernel", "shape", "config", "median ms", "% cuBLAS bf16", "% cuBLAS fp32 out", "regs", "spills",
           "first launch s", "rel diff vs first config", "note"]


def shapes(tiny: bool) -> dict:
    """bench_core.py's A, Q and L, or tiny ones for the CPU interpreter (H, V and N still differ)."""
    from prefops.tools.bench import Shape
    if not tiny:
        from bench_core import SHAPES
        return {name: SHAPES[name] for name in "AQL"}
    return {"A": Shape(pairs=1, tokens=32, hidden=32, vocab=128), "Q": Shape(pairs=1, tokens=16, hidden=48, vocab=160),
            "L": Shape(pairs=1, tokens=64, hidden=32, vocab=128)}


def every_config() -> Optional[str]:
    """Make the kernels, when next defined, carry every config; a note when they were defined already."""
    os.environ["PREFOPS_AUTOTUNE"] = "full"
    loaded = [name for name in sys.modules if name.startswith("prefops.kernels.")]
    return f"kernels defined before the sweep: configs as imported ({', '.join(loaded)})" if loaded else None


# ---------------------------------------------------------------- the kernels

def gemm_kernels():
    """[(name, kernel object, jit function)] of every kernel with a BLOCK_K loop, PRIORITY first."""
    import prefops.kernels
    from triton.runtime import Autotuner
    found = []
    for info in pkgutil.iter_modules(prefops.kernels.__path__):
        module = importlib.import_module(f"prefops.kernels.{info.name}")
        for name, obj in vars(module).items():
            jit = obj.fn if isinstance(obj, Autotuner) else obj
            if name.endswith("_kernel") and "BLOCK_K" in getattr(jit, "arg_names", ()):
                found.append((name, obj, jit))
    order = lambda item: (PRIORITY.index(item[0]) if item[0] in PRIORITY else len(PRIORITY), item[0])  # noqa: E731
    return sorted(found, key=order)


def configs_of(kernel) -> list:
    """An autotuned kernel's configs; a plain one runs with the launch's own block sizes (one None config)."""
    return list(getattr(kernel, "configs", None) or [None])


def config_text(config) -> str:
    if config is None:
        return "launcher's own"
    return " ".join([*(f"{k}={v}" for k, v in config.kwargs.items()), f"warps={config.num_warps}",
                     f"stages={config.num_stages}"])


@dataclasses.dataclass
class Launch:
    grid: object
    args: tuple
    kwargs: dict


class Capture:
    """Stands in for a kernel object: `kernel[grid](*args, **kwargs)` records the launch instead."""

    def __init__(self):
        self.launches: list[Launch] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(grid, args, kwargs))


def capture_launches(kernel, call: Callable) -> list[Launch]:
    """The launches `call` makes of `kernel`, none of them run: every loaded module that holds the kernel
    object (its own, and any launcher's that imported it by name) gets a Capture in its place for the call."""
    holders = [module for module in list(sys.modules.values())
               if any(value is kernel for value in list(getattr(module, "__dict__", {}).values()))]
    names = [[name for name, value in list(vars(module).items()) if value is kernel] for module in holders]
    capture = Capture()
    for module, attributes in zip(holders, names):
        for name in attributes:
            setattr(module, name, capture)
    try:
        call()
    finally:
        for module, attributes in zip(holders, names):
            for name in attributes:
                setattr(module, name, kernel)
    if not capture.launches:
        raise RuntimeError("the launcher made no launch of the kernel")
    return capture.launches


def replay(jit, launches: list[Launch], config):
    """Run the raw jit function with the captured arguments and one config; returns the last compiled kernel."""
    compiled = None
    for launch in launches:
        options = {} if config is None else config.all_kwargs()
        compiled = jit[launch.grid](*launch.args, **{**launch.kwargs, **options})
    return compiled


def outputs(jit, launches: list[Launch]) -> list:
    """The distinct tensors the launches write (OUTPUT_PARAMS), in order."""
    seen, found = set(), []
    for launch in launches:
        for name, value in zip(jit.arg_names, launch.args):
            if name in OUTPUT_PARAMS and hasattr(value, "data_ptr") and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                found.append(value)
    return found


# ---------------------------------------------------------------- operands and launchers

@dataclasses.dataclass
class Operands:
    """bench_core's data at one shape: every token's h, W, the counted rows and their targets."""
    hidden: object      # [2P T, H] bf16
    weight: object      # [V, H] bf16
    rows: object        # [N] int64, the counted tokens
    targets: object     # [N] int32
    cache: dict = dataclasses.field(default_factory=dict)

    @property
    def counted(self) -> int:
        return self.rows.numel()

    def reference(self):
        """(h, W) of a reference model: the policy plus 0.3 x std noise (bench_tdpo.py's), a KL of order 1."""
        if "reference" not in self.cache:
            import torch
            def noise(x):
                return (x + 0.3 * x.float().std() * torch.randn_like(x, dtype=torch.float32)).to(x.dtype)
            self.cache["reference"] = noise(self.hidden), noise(self.weight)
        return self.cache["reference"]

    def lse(self, reference: bool = False):
        """[N] fp32 log-sum-exp of the counted rows' logits, by cuBLAS in row chunks: the gradient kernels'
        saved statistic, exact so that p = exp(z - lse) stays in [0, 1] as in training."""
        key = f"lse{reference}"
        if key not in self.cache:
            import torch
            hidden, weight = self.reference() if reference else (self.hidden, self.weight)
            parts = [logits_fp32(hidden.index_select(0, self.rows[r:r + 2048]), weight).logsumexp(-1)
                     for r in range(0, self.counted, 2048)]
            self.cache[key] = torch.cat(parts)
        return self.cache[key]

    def per_row(self, scale: float):
        """[N] fp32 random per-row values: upstream gradients, a KL."""
        import torch
        return scale * torch.randn(self.counted, device=self.hidden.device)


def logits_fp32(a, weight):
    import torch
    if a.is_cuda:
        return torch.mm(a, weight.t(), out_dtype=torch.float32)
    return a.float() @ weight.float().t()


def make_operands(shape, device, seed: int = 0) -> Operands:
    import torch
    from prefops.tools.bench import IGNORE_INDEX, LOGIT_STD, PADDING_FRACTION, PROMPT_FRACTION
    generator = torch.Generator(device=device).manual_seed(seed)
    sequences = 2 * shape.pairs
    hidden = torch.randn(sequences * shape.tokens, shape.hidden, device=device, generator=generator,
                         dtype=torch.bfloat16)
    weight = (torch.randn(shape.vocab, shape.hidden, device=device, generator=generator)
              * (LOGIT_STD / math.sqrt(shape.hidden))).to(torch.bfloat16)
    targets = torch.randint(0, shape.vocab, (sequences, shape.tokens), device=device, generator=generator)
    targets[:, :int(PROMPT_FRACTION * shape.tokens)] = IGNORE_INDEX
    targets[:, shape.tokens - int(PADDING_FRACTION * shape.tokens):] = IGNORE_INDEX
    flat = targets.view(-1)
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    return Operands(hidden, weight, rows, flat.index_select(0, rows).to(torch.int32))


def gradient_tile(ops: Operands):
    """[N, V] in the input dtype: what the gradient kernels fill."""
    import torch
    return torch.empty(ops.counted, ops.weight.shape[0], device=ops.hidden.device, dtype=ops.hidden.dtype)


# Each: (cuBLAS GEMMs of the kernel's work, its launcher called on Operands as the training path calls it:
# no bias, no softcap, temperature 1, log p without the optional statistics).
def launch_stats(ops: Operands):
    from prefops.kernels.logits_stats import launch_logits_stats
    launch_logits_stats(ops.hidden, ops.weight, None, ops.rows, ops.targets, 1.0, None, extras=(False, False, False))


def launch_grad(ops: Operands):
    from prefops.kernels.logits_grad import launch_logits_grad
    launch_logits_grad(ops.hidden, ops.weight, None, ops.rows, ops.targets, ops.lse(), None, ops.per_row(0.1),
                       ops.per_row(0.01), None, 1.0, None, 0, gradient_tile(ops))


def launch_kl_stats(ops: Operands):
    from prefops.kernels.token_kl_stats import launch_token_kl_stats
    launch_token_kl_stats(ops.hidden, ops.weight, None, *ops.reference(), None, ops.rows, ops.targets, 1.0, None)


def launch_kl_grad(ops: Operands):
    from prefops.kernels.token_kl_grad import launch_token_kl_grad
    ref_hidden, ref_weight = ops.reference()
    launch_token_kl_grad(ops.hidden, ops.weight, None, ref_hidden, ref_weight, None, ops.rows, ops.targets,
                         ops.lse(), ops.lse(reference=True), ops.per_row(1.0).abs(), ops.per_row(0.1),
                         ops.per_row(0.1), False, 1.0, None, 0, gradient_tile(ops))


SETUPS = {"logits_stats_kernel": (1, launch_stats), "logits_grad_kernel": (1, launch_grad),
          "token_kl_stats_kernel": (2, launch_kl_stats), "token_kl_grad_kernel": (2, launch_kl_grad)}


# ---------------------------------------------------------------- the sweep

class Clock:
    """The deadline, and what a step usually needs: a first launch's compile, a launch's time."""

    def __init__(self, deadline: float, device_type: str):
        self.deadline = deadline
        self.compile_guess = COMPILE_GUESS if device_type == "cuda" else 0.0

    def left(self) -> float:
        return self.deadline - time.time()

    def skip(self, needs: float) -> Optional[str]:
        if self.left() >= needs:
            return None
        return f"skipped: out of time ({max(self.left(), 0):.0f} s left, needs ~{needs:.0f} s)"


def cublas(ops: Operands, device, reps: int, warmup: int) -> dict:
    """Medians of one GEMM over the counted rows: bf16 out, and bf16 with fp32 out (n/a off CUDA)."""
    import torch
    from prefops.tools.bench import median_ms
    counted = ops.hidden.index_select(0, ops.rows)
    weight_t = ops.weight.t()
    times = {"bf16_ms": median_ms(lambda: counted @ weight_t, device=device, reps=reps, warmup=warmup)}
    times["fp32_out_ms"] = (median_ms(lambda: torch.mm(counted, weight_t, out_dtype=torch.float32), device=device,
                                      reps=reps, warmup=warmup) if device.type == "cuda" else None)
    return times


def baseline(shape, device, reps: int, warmup: int):
    """(Operands at `shape`, their cuBLAS medians)."""
    ops = make_operands(shape, device)
    return ops, cublas(ops, device, reps, warmup)


def percent(gemms: int, base_ms, ms) -> Optional[float]:
    return None if base_ms is None or not ms else 100.0 * gemms * base_ms / ms


def sweep_kernel_shape(name, kernel, jit, gemms, launcher, shape_name, ops, base, device, timing, clock, log,
                       compiled: set):
    """Every config of one kernel at one shape, each recorded when done."""
    import torch
    from prefops.tools.bench import attempt, median_ms, relative_error
    launches, reason = attempt(lambda: capture_launches(kernel, lambda: launcher(ops)))
    if reason:
        return log(kind="config", kernel=name, shape=shape_name, config="all", reason=f"launcher: {reason}")
    written = outputs(jit, launches)
    expected = None
    est_ms = 2.0 * gemms * base["bf16_ms"]  # a fused kernel at half cuBLAS speed, until one is measured
    for config in configs_of(kernel):
        label = config_text(config)
        key = (name, label)
        needs = (0.0 if key in compiled else clock.compile_guess) + (timing.reps + timing.warmup + EXTRA_LAUNCHES) \
            * est_ms / 1e3
        skipped = clock.skip(needs)
        if skipped:
            log(kind="config", kernel=name, shape=shape_name, config=label, reason=skipped)
            continue

        def measure():
            begin = time.perf_counter()
            kernel_binary = replay(jit, launches, config)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first = time.perf_counter() - begin
            for tensor in written:
                if tensor.is_floating_point():
                    tensor.fill_(float("nan"))
            replay(jit, launches, config)
            result = [tensor.clone() for tensor in written]
            diff = None if expected is None else max(relative_error(a, e) for a, e in zip(result, expected))
            unwritten = any(bool(t.isnan().any()) for t in result)
            ms = median_ms(lambda: replay(jit, launches, config), device=device, reps=timing.reps,
                           warmup=timing.warmup)
            return first, result, diff, unwritten, ms, kernel_binary

        measured, reason = attempt(measure)
        compiled.add(key)
        if measured is None:
            log(kind="config", kernel=name, shape=shape_name, config=label, reason=reason)
            continue
        first, result, diff, unwritten, ms, binary = measured
        if expected is None:
            expected = result
        clock.compile_guess = max(clock.compile_guess, first) if device.type == "cuda" else 0.0
        est_ms = ms
        notes = ["output elements left unwritten (NaN)"] if unwritten else []
        log(kind="config", kernel=name, shape=shape_name, config=label,
            params=None if config is None else config.all_kwargs(), ms=ms,
            pct_bf16=percent(gemms, base["bf16_ms"], ms), pct_fp32_out=percent(gemms, base["fp32_out_ms"], ms),
            n_regs=getattr(binary, "n_regs", None), n_spills=getattr(binary, "n_spills", None),
            first_launch_s=first, rel_diff=diff, gemms=gemms, reason="; ".join(notes) or None)
    return None


def sweep(device, table: dict, *, deadline: float, reps: int, warmup: int, log: Callable, kernels=None,
          shape_names="AQL"):
    """Records of every config of every GEMM-fused kernel (or those named in `kernels`) at `shape_names`
    of `table` ({name: Shape}), handed to log(**record) as each is made, within `deadline` (epoch s).
    Call every_config() before anything imports prefops.kernels."""
    from prefops.tools.bench import attempt, free_memory
    clock = Clock(deadline, device.type)
    timing = argparse.Namespace(reps=reps, warmup=warmup)
    found = gemm_kernels()
    if kernels:
        unknown = sorted(set(kernels) - {name for name, _, _ in found})
        if unknown:
            raise ValueError(f"kernels: unknown {', '.join(unknown)}; GEMM-fused kernels: "
                             f"{', '.join(name for name, _, _ in found)}")
        found = [item for item in found if item[0] in kernels]
    operands, bases, compiled = {}, {}, set()
    for name, kernel, jit in found:
        if name not in SETUPS:
            log(kind="config", kernel=name, shape="all", config="all",
                reason="not timed: no launcher setup in benchmarks/kernel_sweep.py SETUPS")
            continue
        gemms, launcher = SETUPS[name]
        for shape_name in shape_names:
            if shape_name not in bases:
                skipped = clock.skip(5.0 if device.type == "cuda" else 0.0)
                if skipped:
                    log(kind="config", kernel=name, shape=shape_name, config="all", reason=skipped)
                    continue
                shape = table[shape_name]
                prepared, reason = attempt(lambda: baseline(shape, device, reps, warmup))
                operands[shape_name], bases[shape_name] = prepared or (None, None)
                log(kind="cublas", shape=shape_name, counted=prepared and prepared[0].counted, hidden=shape.hidden,
                    vocab=shape.vocab, **(prepared[1] if prepared else {}), reason=reason)
            if bases[shape_name] is None:
                log(kind="config", kernel=name, shape=shape_name, config="all", reason="no cuBLAS baseline")
                continue
            sweep_kernel_shape(name, kernel, jit, gemms, launcher, shape_name, operands[shape_name],
                               bases[shape_name], device, timing, clock, log, compiled)
            free_memory()


# ---------------------------------------------------------------- reporting

def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(headers, rows) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def markdown(records) -> str:
    """The cuBLAS baselines, then one table row per config and the best config of each kernel and shape.
    Standard library only: first light's summary reads the records without importing prefops."""
    lines = table(["shape", "counted rows", "H", "V", "cuBLAS bf16 ms", "cuBLAS fp32-out ms", "note"],
                  [[r["shape"], r["counted"], r["hidden"], r["vocab"], fmt(r.get("bf16_ms"), ".3f"),
                    fmt(r.get("fp32_out_ms"), ".3f"), r.get("reason") or ""]
                   for r in records if r.get("kind") == "cublas"])
    configs = [r for r in records if r.get("kind") == "config"]
    rows = [[r["kernel"], r["shape"], r["config"], fmt(r.get("ms"), ".3f"), fmt(r.get("pct_bf16"), ".0f"),
             fmt(r.get("pct_fp32_out"), ".0f"), fmt(r.get("n_regs"), "d"), fmt(r.get("n_spills"), "d"),
             fmt(r.get("first_launch_s"), ".1f"), fmt(r.get("rel_diff"), ".1e"),
             "; ".join(filter(None, ["two GEMMs' work" if r.get("gemms", 1) > 1 else "", r.get("reason")]))]
            for r in configs]
    best = {}
    for r in configs:
        if r.get("ms") and not r.get("reason"):
            key = (r["kernel"], r["shape"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    picks = [f"- {kernel} at {shape}: {r['config']}, {r['ms']:.3f} ms, {fmt(r.get('pct_bf16'), '.0f')}% of cuBLAS bf16"
             for (kernel, shape), r in best.items()]
    return "\n".join([*lines, "", *table(HEADERS, rows), "", "Fastest config:", *(picks or ["- none timed"])])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for kernel-sweep.md and kernel-sweep.jsonl")
    parser.add_argument("--seconds", type=float, default=180.0, help="time for the whole sweep (default 180)")
    parser.add_argument("--shapes", default="AQL", help="letters of the shapes, from A, Q, L (default AQL)")
    parser.add_argument("--kernels", default="", help="comma-separated kernel names (default: every GEMM-fused one)")
    parser.add_argument("--reps", type=int, help=f"timed launches per config (default {REPS[0]} on CUDA, "
                                                 f"{REPS[1]} on CPU)")
    parser.add_argument("--warmup", type=int, help=f"untimed launches first (default {WARMUP[0]} on CUDA, "
                                                   f"{WARMUP[1]} on CPU)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for the CPU dry run")
    args = parser.parse_args(argv)
    if not args.shapes or set(args.shapes) - set("AQL"):
        parser.error(f"--shapes must be letters from A, Q, L; got {args.shapes!r}")
    if args.seconds <= 0:
        parser.error(f"--seconds must be > 0; got {args.seconds}")
    begin = time.time()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    note = every_config()
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device; for a dry run: --device cpu --tiny")
    device = torch.device(args.device)
    on_cpu = int(device.type != "cuda")
    reps = args.reps or REPS[on_cpu]
    warmup = args.warmup if args.warmup is not None else WARMUP[on_cpu]
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / "kernel-sweep.jsonl"
    jsonl.write_text("")
    records = []

    def log(**record):
        records.append(record)
        with jsonl.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(" | ".join(f"{k}={v}" for k, v in record.items()), flush=True)

    from prefops.tools.bench import environment_line
    sweep(device, shapes(args.tiny), deadline=begin + args.seconds, reps=reps, warmup=warmup, log=log,
          kernels=[name for name in args.kernels.split(",") if name], shape_names=args.shapes)
    report = "\n".join([
        "# Kernel sweep" + (" (CPU DRY RUN, tiny shapes: timings meaningless)" if args.tiny else ""), "",
        environment_line(device), "",
        f"Median of {reps} launches after {warmup} warm-up" + ("" if device.type == "cuda" else " (wall clock)")
        + f"; {time.time() - begin:.0f} s of {args.seconds:.0f}." + (f" Note: {note}." if note else ""), "",
        markdown(records)])
    (args.out / "kernel-sweep.md").write_text(report + "\n")
    print(report, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
