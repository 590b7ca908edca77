"""Op-level benchmark: DPO (sigmoid, beta 0.1) forward+backward from final hidden states and lm_head.

`prefops bench` (this module's add_commands) and benchmarks/bench_core.py both run on it.
Every row gets the same data and is compared with the floor (the three GEMMs
any exact method must run over the counted tokens: h W^T, G W, G^T h), and its
loss and gradients are checked against an exact (fp32 or float64) version of
the naive math, so a fast-but-wrong row shows. Rows: naive PyTorch,
torch.compile of it, prefops lean and budget, TRL's fused head, Liger and
cut-cross-entropy when installed. Everything takes a torch.device, so it also
runs on CPU as a smoke test (wall-clock timing there; memory from
prefops.memory.AllocationRecorder).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..config import settings
from ..memory import AllocationRecorder
from ..objective import sequence_objective
from ..ops import linear_logprobs
from ..sequences import sequence_sum
from .options import (  # noqa: F401 - the benchmark scripts import these from here
    PRESETS, TINY, add_choices_option, add_timing_options, choices_option)

BETA = 0.1
IGNORE_INDEX = -100
PROMPT_FRACTION, PADDING_FRACTION = 0.10, 0.25
LOGIT_STD = 4.0
# Reference log-probs are the policy's own sequence log-probs plus this much
# noise: as in real DPO the policy starts near the reference, so the sigmoid
# is not saturated (beta * margin has std ~1.4) and every pair has a gradient.
REFERENCE_NOISE = 10.0
GIB = 1 << 30


# ---------------------------------------------------------------- measuring

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


def peak_during(fn, *, device: torch.device, record_cpu: bool = False, before=None):
    """Return (fn(), peak bytes allocated during fn beyond those allocated before it).

    On CUDA from the caching allocator's counters. Off CUDA the bytes are None,
    unless record_cpu: then every allocation is recorded (prefops.memory); a row
    the recorder cannot run under (a compiled graph) is rerun plainly, after
    before(), and gets None.
    """
    if device.type != "cuda":
        if not record_cpu:
            return fn(), None
        recorder = AllocationRecorder()
        try:
            with recorder:
                result = fn()
        except Exception:  # noqa: BLE001 - the row's own failures show in the plain rerun
            (before or (lambda: None))()
            return fn(), None
        return result, recorder.peak
    gc.collect()
    torch.cuda.synchronize(device)
    allocated = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - allocated


def relative_error(value, expected) -> float:
    """||value - expected|| / ||expected||, accumulated in fp32 (float64 for a float64 operand) without an
    fp32 copy of either; NaN gives inf."""
    wide = torch.float64 if torch.float64 in (value.dtype, expected.dtype) else torch.float32
    diff = torch.linalg.vector_norm(value.detach() - expected.detach(), dtype=wide)
    error = float(diff / torch.linalg.vector_norm(expected.detach(), dtype=wide))
    return float("inf") if math.isnan(error) else error


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


def report_heading(title: str, tiny: bool, device: torch.device) -> list[str]:
    """A report's first lines: its title (marked when the shapes are tiny) and the environment."""
    return ["# " + title + (" (TINY SMOKE TEST: timings meaningless)" if tiny else ""), "",
            environment_line(device)]


def markdown_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(ms):
    return "—" if ms is None else f"{ms:.2f}"


def fmt_gb(nbytes):
    if nbytes is None:
        return "n/a"
    # Tiny smoke-test shapes allocate kilobytes: keep them visible.
    return f"{nbytes / GIB:.2f}" if abs(nbytes) >= GIB // 100 or nbytes == 0 else f"{nbytes / GIB:.1e}"


# ---------------------------------------------------------------- the problem

@dataclasses.dataclass(frozen=True)
class Shape:
    pairs: int
    tokens: int  # per sequence
    hidden: int
    vocab: int
    softcap: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Problem:
    """A padded batch [2P, T] stacked as [chosen of every pair; rejected of every pair]."""
    hidden: torch.Tensor   # [2P, T, H] leaf
    weight: torch.Tensor   # [V, H] leaf
    targets: torch.Tensor  # [2P, T] long, IGNORE_INDEX on prompt and padding
    ref: torch.Tensor      # [2P] fp32 reference sequence log-probs
    softcap: Optional[float] = None

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX

    @property
    def pairs(self) -> int:
        return self.hidden.shape[0] // 2

    @property
    def gradient_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.weight))

    def clear_gradients(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def naive_token_logps(hidden, weight, targets, softcap=None):
    """Materialised logits: GEMM in the input dtype, fp32 (or wider) log_softmax, gather; 0 at ignored tokens."""
    logits = F.linear(hidden, weight)
    logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != IGNORE_INDEX, picked, 0.0)


def make_problem(shape: Shape, device: torch.device, seed: int = 0, dtype=torch.bfloat16) -> Problem:
    torch.manual_seed(seed)
    sequences = 2 * shape.pairs
    hidden = torch.randn(sequences, shape.tokens, shape.hidden, device=device, dtype=dtype)
    weight = torch.randn(shape.vocab, shape.hidden, device=device, dtype=dtype)
    weight.mul_(LOGIT_STD / math.sqrt(shape.hidden))
    targets = torch.randint(0, shape.vocab, (sequences, shape.tokens), device=device)
    targets[:, : int(PROMPT_FRACTION * shape.tokens)] = IGNORE_INDEX
    targets[:, shape.tokens - int(PADDING_FRACTION * shape.tokens):] = IGNORE_INDEX
    ref = exact_sequence_logps(hidden, weight, targets, shape.softcap).float()
    ref += REFERENCE_NOISE * torch.randn_like(ref)
    return Problem(hidden.requires_grad_(), weight.requires_grad_(), targets, ref, shape.softcap)


def token_chunks(count):
    # fp32 logits of one chunk take 2048 x V x 4 bytes, about 1 GB at V = 128k.
    return [slice(i, i + 2048) for i in range(0, count, 2048)]


@torch.no_grad()
def exact_sequence_logps(hidden, weight, targets, softcap=None, dtype=torch.float32):
    """Per-sequence log-prob sums from logits in `dtype` (fp32 or float64), chunked so memory stays
    far below the naive row's."""
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    weight = weight.to(dtype)
    logp = torch.cat([naive_token_logps(flat_hidden[c].to(dtype), weight, flat_targets[c], softcap)
                      for c in token_chunks(flat_targets.numel())])
    return logp.view(targets.shape).sum(-1)


def as_pairs(per_sequence):
    """[2P] stacked [chosen; rejected] -> [P, 2] (chosen, rejected)."""
    return per_sequence.view(2, -1).t()


def dpo_pair_losses(pair_logps, pair_ref):
    """Sigmoid DPO loss per pair from [G, 2] (chosen, rejected) policy and reference log-probs."""
    ratios = pair_logps - pair_ref
    return -F.logsigmoid(BETA * (ratios[:, 0] - ratios[:, 1]))


def dpo_loss(sequence_logps, ref):
    return dpo_pair_losses(as_pairs(sequence_logps), as_pairs(ref.to(sequence_logps.dtype))).mean()


def naive_loss(hidden, weight, targets, ref, softcap=None):
    return dpo_loss(naive_token_logps(hidden, weight, targets, softcap).sum(-1), ref)


# ---------------------------------------------------------------- rows
# Each builder takes a Problem and returns a closure computing the scalar loss.

def build_naive(p: Problem):
    return lambda: naive_loss(p.hidden, p.weight, p.targets, p.ref, p.softcap)


def build_compiled(p: Problem):
    compiled = torch.compile(naive_loss)
    return lambda: compiled(p.hidden, p.weight, p.targets, p.ref, p.softcap)


def build_prefops_tokens(p: Problem):
    sequences, tokens, width = p.hidden.shape
    mask = p.mask

    def loss():
        logp = linear_logprobs(p.hidden.view(-1, width), p.weight, p.targets.view(-1),
                               ignore_index=IGNORE_INDEX, softcap=p.softcap)
        return dpo_loss(sequence_sum(logp.view(sequences, tokens), mask), p.ref)
    return loss


def build_prefops_objective(p: Problem):
    sequences, tokens, width = p.hidden.shape
    device = p.hidden.device
    seq_ids = torch.arange(sequences, device=device).repeat_interleave(tokens)
    chosen = torch.arange(p.pairs, device=device)
    groups = torch.stack([chosen, chosen + p.pairs], dim=1)
    ref_pairs = as_pairs(p.ref)

    def head(logps, group_index, stats):
        return dpo_pair_losses(logps, ref_pairs[group_index]).sum() / p.pairs

    return lambda: sequence_objective(
        p.hidden.view(-1, width), p.weight, p.targets.view(-1),
        head=head, seq_ids=seq_ids, groups=groups, ignore_index=IGNORE_INDEX, softcap=p.softcap,
    ).loss


def build_liger(p: Problem):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    if p.softcap is not None:
        raise Skipped("LigerFusedLinearDPOLoss has no logit softcap")
    # Liger takes a reference model (ref_input, ref_weight), not precomputed
    # reference log-probs; use_ref_model=False (reference = 0) keeps its work
    # to the same three GEMMs as every other row.
    loss_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=BETA, use_ref_model=False,
                                      average_log_prob=False, loss_type="sigmoid")
    return lambda: loss_fn(p.weight, p.hidden, p.targets)[0]  # returns (loss, aux outputs)


def cce_token_logps(hidden, weight, targets, softcap=None):
    from cut_cross_entropy import linear_cross_entropy
    # CCE's own kernels are CUDA-only; its torch_compile impl lets the CPU smoke test run the rows.
    impl = "cce" if hidden.is_cuda else "torch_compile"
    return -linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, softcap=softcap,
                                 reduction="none", impl=impl)


def build_cce(p: Problem):
    return lambda: dpo_loss(cce_token_logps(p.hidden, p.weight, p.targets, p.softcap).sum(-1), p.ref)


def trl_token_logps(hidden, weight, targets, softcap=None):
    """Per-token log-probs (0 at ignored tokens) from TRL's fused head as its DPOTrainer runs it
    (trl.trainer.utils.add_fused_lm_head, trl >= 1.16): ChunkedLogProbFunction over the counted tokens
    alone, cuBLAS tiles of 4096 tokens x its default vocabulary chunk, folded by Triton on CUDA (by
    torch ops elsewhere), dh and dW accumulated in fp32."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    counted = targets != IGNORE_INDEX
    logps = ChunkedLogProbFunction.apply(hidden[counted], weight, None, targets[counted], 1.0,
                                         _CHUNKED_LOGPROB_CHUNK_SIZE, softcap, 1.0, ("log_probs",))[0]
    return logps.new_zeros(counted.shape).masked_scatter(counted, logps)


def build_trl(p: Problem):
    return lambda: dpo_loss(trl_token_logps(p.hidden, p.weight, p.targets, p.softcap).sum(-1), p.ref)


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    build: Callable[[Problem], Callable[[], torch.Tensor]]
    settings: dict = dataclasses.field(default_factory=dict)  # prefops.settings around forward and backward
    zero_ref: bool = False  # cannot take precomputed reference log-probs: runs, and is checked, with ref = 0
    note: str = ""
    compiled: bool = False  # a compiled graph: the CPU allocation recorder would measure its eager fallback
    reports_path: bool = False  # a prefops row: its note names the path that ran (last_path)


ROWS = {
    "naive": Row("naive PyTorch", build_naive),
    "compile": Row("torch.compile(naive)", build_compiled, compiled=True),
    "lean": Row("prefops lean", build_prefops_tokens, {"strategy": "lean"}, reports_path=True),
    "budget": Row("prefops budget 1 GB", build_prefops_objective, {"strategy": "budget", "budget": "1GB"},
                  note="sequence_objective", reports_path=True),
    "trl": Row("TRL ChunkedLogProbFunction", build_trl,
               note="DPOTrainer's fused head; log-probs only (the trainer adds entropy, mean logit, top-1)"),
    "liger": Row("Liger LigerFusedLinearDPOLoss", build_liger, zero_ref=True, compiled=True,
                 note="takes no precomputed ref logps: runs and is checked with ref = 0"),
    "cce": Row("CCE linear_cross_entropy", build_cce, note="reduction='none', default filter_eps", compiled=True),
}


# `prefops bench --rows` takes ROWS (prefops.tools.options.ROW_NAMES lists them without importing torch);
# the benchmark scripts and first light also run the row a user gets without choosing a strategy:
# prefops.settings' default ("auto", the fastest exact path within the workspace).
BENCH_ROWS = {"default": Row("prefops default", build_prefops_objective, note="sequence_objective",
                             reports_path=True), **ROWS}


def last_path() -> str:
    """The path the last fused call ran (prefops.strategy.last_path(): stored, chunked, sliced or lean);
    "none" when no fused call ran, "n/a" for a prefops that does not record it."""
    try:
        from .. import strategy
    except ImportError:
        return "n/a"
    return strategy.last_path() or "none"


def row_note(row: Row) -> str:
    """The row's note, with the path that ran for a prefops row (read right after the row's last call)."""
    return "; ".join(filter(None, [row.note, f"path {last_path()}" if row.reports_path else ""]))


def build_floor(p: Problem):
    """The three GEMMs of any exact method, over the counted tokens only: logits, dh = G W, dW = G^T h."""
    counted = p.hidden.detach()[p.mask]
    weight = p.weight.detach()
    grad_logits = torch.randn(counted.shape[0], weight.shape[0], device=counted.device, dtype=counted.dtype)

    def gemms():
        counted @ weight.t()
        grad_logits @ weight
        grad_logits.t() @ counted
    return gemms


def forward_ops(p: Problem):
    """Forward-only ops at one shape, each a closure; the first is the denominator."""
    width = p.hidden.shape[-1]
    flat_hidden, flat_targets = p.hidden.detach().view(-1, width), p.targets.view(-1)
    counted = p.hidden.detach()[p.mask]
    weight = p.weight.detach()

    return {
        "one GEMM, counted tokens": lambda: counted @ weight.t(),
        "one GEMM, all tokens": lambda: flat_hidden @ weight.t(),
        "naive forward (logps)": lambda: naive_token_logps(flat_hidden, weight, flat_targets, p.softcap),
        "CCE forward (logps)": lambda: cce_token_logps(flat_hidden, weight, flat_targets, p.softcap),
        "TRL forward (logps)": lambda: trl_token_logps(flat_hidden, weight, flat_targets, p.softcap),
        "prefops forward (linear_logprobs, no_grad)":
            lambda: linear_logprobs(flat_hidden, weight, flat_targets, ignore_index=IGNORE_INDEX, softcap=p.softcap),
    }


def reference_outputs(p: Problem, dtype=torch.float32, loss_of=None):
    """(loss, dh, dW) from logits in `dtype`, in token chunks: the yardstick for every row, naive included.

    loss_of(sequence_logps [2P]) gives the loss; the DPO loss against p.ref by default.

    The naive row rounds bf16 logits, which alone moves a long sequence's
    log-prob sum by about 1e-2 relative; an fp32 yardstick keeps that from
    passing for an error in the rows that avoid the rounding. float64 is the
    yardstick for fp32 problems (the CPU checks).
    """
    sequence_logps = exact_sequence_logps(p.hidden, p.weight, p.targets, p.softcap, dtype).requires_grad_()
    loss = dpo_loss(sequence_logps, p.ref) if loss_of is None else loss_of(sequence_logps)
    loss.backward()
    # d loss / d token logp is its sequence's gradient; push it through each chunk's logits.
    token_grads = sequence_logps.grad.repeat_interleave(p.targets.shape[1])
    hidden, targets = p.hidden.detach().view(-1, p.hidden.shape[-1]), p.targets.view(-1)
    weight = p.weight.detach().to(dtype).requires_grad_()
    dh = torch.empty(hidden.shape, device=hidden.device, dtype=dtype)
    for c in token_chunks(targets.numel()):
        rows = hidden[c].to(dtype).requires_grad_()
        naive_token_logps(rows, weight, targets[c], p.softcap).backward(token_grads[c])
        dh[c] = rows.grad
    return loss.detach(), dh.view(p.hidden.shape), weight.grad


def row_step(row: Row, p: Problem):
    """One forward+backward of the row under its prefops settings; returns the detached loss."""
    loss_fn = row.build(p)

    def step():
        with settings(**row.settings):
            loss = loss_fn()
            loss.backward()
        return loss.detach()
    return step


def measure_row(row: Row, p: Problem, expected, device, args, *, record_cpu=False):
    """Median fwd+bwd time, memory beyond the gradients, and relative errors against `expected`.

    args needs reps and warmup."""
    step = row_step(row, p)
    ms = median_ms(step, device=device, reps=args.reps, warmup=args.warmup, before=p.clear_gradients)
    p.clear_gradients()
    loss, peak = peak_during(step, device=device, record_cpu=record_cpu and not row.compiled,
                             before=p.clear_gradients)
    beyond = None if peak is None else peak - p.gradient_bytes
    errors = ["n/a"] * 3
    if expected is not None:
        actual = (loss, p.hidden.grad, p.weight.grad)
        errors = ["no grad" if a is None else f"{relative_error(a, e):.1e}" for a, e in zip(actual, expected)]
    p.clear_gradients()
    return ms, beyond, errors


def row_problem(row: Row, p: Problem) -> Problem:
    return dataclasses.replace(p, ref=torch.zeros_like(p.ref)) if row.zero_ref else p


def bench_shape(name: str, shape: Shape, args, device, *, record_cpu=False):
    """Table rows (floor first) for one shape, and the forward-only rows when name is in args.forward_shapes.

    args needs rows, reps, warmup and forward_shapes."""
    p = make_problem(shape, device)
    counted = int(p.mask.sum())
    print(f"[{name}] {shape}, {counted} counted tokens of {p.targets.numel()}", file=sys.stderr, flush=True)
    floor_ms, reason = attempt(lambda: median_ms(build_floor(p), device=device, reps=args.reps, warmup=args.warmup))
    table = [[name, "floor: 3 GEMMs over counted tokens", fmt_ms(floor_ms), "1.00×" if floor_ms else "n/a",
              "—", "—", "—", "—", reason or ""]]
    print(f"  floor: {fmt_ms(floor_ms)} ms {reason or ''}", file=sys.stderr, flush=True)

    expected = {}
    for key in args.rows:
        row = BENCH_ROWS[key]
        problem = row_problem(row, p)
        if row.zero_ref not in expected:
            expected[row.zero_ref], reason = attempt(lambda: reference_outputs(problem))
            if reason:
                print(f"  fp32 reference for the error columns: {reason}", file=sys.stderr, flush=True)
        result, reason = attempt(lambda: measure_row(row, problem, expected[row.zero_ref], device, args,
                                                     record_cpu=record_cpu))
        if result is None:
            table.append([name, row.label, "—", "—", "—", "—", "—", "—", reason])
        else:
            ms, beyond, errors = result
            ratio = f"{ms / floor_ms:.2f}×" if floor_ms else "n/a"
            table.append([name, row.label, fmt_ms(ms), ratio, fmt_gb(beyond), *errors, row_note(row)])
        cells = zip(TABLE_HEADERS[2:], table[-1][2:])  # labelled: the table with its header comes at the end
        shown = ", ".join(f"{header} {value}" for header, value in cells if value not in ("", "—"))
        print(f"  {row.label}: {shown}", file=sys.stderr, flush=True)

    forward_table = []
    if name in args.forward_shapes:
        timings = {}
        for label, op in forward_ops(p).items():
            timings[label] = attempt(lambda: median_ms(torch.no_grad()(op), device=device, reps=args.reps,
                                                       warmup=args.warmup))
            print(f"  forward {label}: {fmt_ms(timings[label][0])} ms {timings[label][1] or ''}",
                  file=sys.stderr, flush=True)
        base_ms = next(iter(timings.values()))[0]
        for label, (ms, reason) in timings.items():
            ratio = f"{ms / base_ms:.2f}×" if ms and base_ms else "—"
            forward_table.append([name, label, fmt_ms(ms), ratio, reason or ""])
    return table, forward_table


TABLE_HEADERS = ["shape", "row", "median ms", "× floor", "GB beyond grads", "loss rel err", "dh rel err",
                 "dW rel err", "note"]
FORWARD_HEADERS = ["shape", "op", "median ms", "× one GEMM over counted tokens", "note"]


def setup_lines(args, device, record_cpu=False) -> list[str]:
    """The report's description of data, timing and columns."""
    return [
        f"DPO sigmoid, beta {BETA}, mean over pairs; bf16 h ~ N(0,1), W scaled for logit std {LOGIT_STD}; "
        f"first {PROMPT_FRACTION:.0%} and last {PADDING_FRACTION:.0%} of every sequence ignored; "
        f"median of {args.reps} reps after {args.warmup} warm-up"
        + ("; CUDA-event timing" if device.type == "cuda" else "; wall-clock timing") + ".",
        "Memory = peak during fwd+bwd beyond the inputs and W.grad + h.grad"
        + ("" if device.type == "cuda" else " (recorded allocation by allocation on CPU; n/a for compiled rows)"
           if record_cpu else " (no memory figures off CUDA)")
        + ". Relative errors are against a chunked fp32-logit computation of the naive math on the same inputs "
        "(the naive row's own error is its bf16 logits).",
    ]


# ---------------------------------------------------------------- sequence-length sweep and plots

def sweep(shape: Shape, seq_lens, args, device):
    """{row label: [(T, ms, bytes beyond grads or None), ...]} over sequence lengths, floor included.

    Failed points (out of memory, say) are left out of a row's list and reported on stderr."""
    series = {"floor: 3 GEMMs": []}
    for length in seq_lens:
        p = make_problem(dataclasses.replace(shape, tokens=length), device)
        print(f"[sweep T={length}] {p.pairs} pairs", file=sys.stderr, flush=True)
        floor_ms, reason = attempt(lambda: median_ms(build_floor(p), device=device, reps=args.reps,
                                                     warmup=args.warmup))
        if floor_ms is not None:
            series["floor: 3 GEMMs"].append((length, floor_ms, None))
        for key in args.rows:
            row = ROWS[key]
            result, reason = attempt(lambda: measure_row(row, row_problem(row, p), None, device, args,
                                                         record_cpu=True))
            series.setdefault(row.label, [])
            if result is None:
                print(f"  {row.label}: {reason}", file=sys.stderr, flush=True)
            else:
                series[row.label].append((length, result[0], result[1]))
                print(f"  {row.label}: {fmt_ms(result[0])} ms, {fmt_gb(result[1])} GB", file=sys.stderr, flush=True)
        del p
        free_memory()
    return series


def sweep_table(series, seq_lens):
    rows = []
    for label, points in series.items():
        by_length = {length: (ms, nbytes) for length, ms, nbytes in points}
        cells = [f"{fmt_ms(by_length[t][0])} / {fmt_gb(by_length[t][1])}" if t in by_length else "—"
                 for t in seq_lens]
        rows.append([label, *cells])
    return markdown_table(["row", *(f"T={t}: ms / GB" for t in seq_lens)], rows)


def plot_sweep(series, out_dir: Path, title: str) -> list[Path]:
    """time_vs_seq_len.png and memory_vs_seq_len.png in out_dir; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for index, ylabel, filename in ((1, "median fwd+bwd time (ms)", "time_vs_seq_len.png"),
                                    (2, "peak memory beyond gradients (GiB)", "memory_vs_seq_len.png")):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        drawn = 0
        for label, points in series.items():
            xy = [(point[0], point[index]) for point in points if point[index] is not None]
            if not xy:
                continue
            xs, ys = zip(*xy)
            ys = ys if index == 1 else [y / GIB for y in ys]
            axes.plot(xs, ys, marker="o", label=label, linestyle="--" if label.startswith("floor") else "-")
            drawn += 1
        axes.set_xscale("log", base=2)
        axes.set_xlabel("sequence length T (tokens per sequence)")
        axes.set_ylabel(ylabel)
        axes.set_title(title, fontsize=9)
        axes.grid(True, alpha=0.3)
        if drawn:
            axes.legend(fontsize=8)
        else:
            axes.text(0.5, 0.5, "no measurements", ha="center", va="center", transform=axes.transAxes)
        figure.tight_layout()
        path = out_dir / filename
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- model presets



def model_dims(name_or_path: str):
    """(hidden, vocab, softcap) of a bundled preset, or of a Hugging Face config.json (a file or its folder)."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"--model-config: {name_or_path!r} is neither a preset nor a config.json file; "
                         f"presets: {', '.join(PRESETS)}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--model-config: {path} is not valid JSON: {error}") from None
    # Multimodal configs keep the language model's sizes under text_config.
    text = config.get("text_config", config) if "hidden_size" not in config else config
    missing = [key for key in ("hidden_size", "vocab_size") if not isinstance(text.get(key), int)]
    if missing:
        raise ValueError(f"--model-config: {path} has no integer {' or '.join(missing)}")
    return text["hidden_size"], text["vocab_size"], text.get("final_logit_softcapping")


# ---------------------------------------------------------------- `prefops bench`



def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers; got {text!r}") from None
    if any(value < 2 for value in values):
        raise ValueError(f"{option} entries must be >= 2; got {text!r}")
    return values


def timing_defaults(args, *, reps=(20, 3), warmup=(3, 1)) -> None:
    """Fill in --reps and --warmup for the device from the (CUDA, CPU) defaults: CUDA medians need more reps
    than a CPU smoke test."""
    on_cpu = int(args.device != "cuda")
    args.reps = args.reps or reps[on_cpu]
    args.warmup = args.warmup if args.warmup is not None else warmup[on_cpu]


def require_device(args) -> torch.device:
    """torch.device(args.device); exits saying how to smoke-test when it asks for CUDA and there is none."""
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu --tiny for a smoke test")
    return torch.device(args.device)


def rows_option(text: str, option: str = "--rows") -> list[str]:
    return choices_option(text, ROWS, option)


def write_report(text: str, path: Path, *, append: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as handle:
        handle.write(text + "\n")


def autotune_choices() -> list[str]:
    """The launch config the Triton autotuner chose for each prefops kernel and key so far,
    so a results log says which tiles the timings ran on (tests/compile_for_hopper.py
    --profile reports their registers and spills)."""
    try:
        from triton.runtime import Autotuner
    except ImportError:
        return []
    picks = set()
    # Only a kernel module that was imported can have launched, so the loaded ones are all there is to read.
    modules = [module for name, module in list(sys.modules.items()) if name.startswith("prefops.kernels.")]
    for module in modules:
        for name, obj in vars(module).items():
            if isinstance(obj, Autotuner):
                picks.update(f"- {name} {tuple(key)}: {config}" for key, config in obj.cache.items())
    return ["", "Autotuner picks:", *sorted(picks)] if picks else []


def finish_report(text: str, path: Optional[Path], *, append: bool = False) -> None:
    """Print the report with the autotuner's picks, and write it to `path` (--out) when given."""
    text = "\n".join([text, *autotune_choices()])
    print(text)
    if path:
        write_report(text, path, append=append)


def bench_config(args):
    """Resolve the model, shapes and defaults of `prefops bench`; ValueError on bad input."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA GPU found: this benchmark times GPU kernels. For a smoke test of the "
                         "benchmark on this machine run: prefops bench --device cpu --tiny")
    hidden, vocab, softcap = model_dims(args.model_config)
    pick = lambda given, tiny, full: given if given is not None else (tiny if args.tiny else full)  # noqa: E731
    hidden = pick(args.hidden, TINY["hidden"], hidden)
    vocab = pick(args.vocab, TINY["vocab"], vocab)
    softcap = args.softcap if args.softcap is not None else softcap
    tokens = pick(args.tokens, TINY["tokens"], 8192)
    seq_len = pick(args.seq_len, TINY["seq_len"], 1024)
    seq_lens = _int_list(args.seq_lens, "--seq-lens") if args.seq_lens is not None else \
        list(TINY["seq_lens"] if args.tiny else (1024, 2048, 4096, 8192))
    for value, option in ((hidden, "--hidden"), (vocab, "--vocab"), (seq_len, "--seq-len"),
                          (args.sweep_pairs, "--sweep-pairs")):
        if value < 1:
            raise ValueError(f"{option} must be >= 1; got {value}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"--softcap must be > 0; got {softcap}")
    if tokens < 2 * seq_len:
        raise ValueError(f"--tokens must hold at least one pair, 2 x --seq-len = {2 * seq_len}; got {tokens}")
    shape = Shape(pairs=tokens // (2 * seq_len), tokens=seq_len, hidden=hidden, vocab=vocab, softcap=softcap)
    options = argparse.Namespace(rows=rows_option(args.rows), reps=args.reps, warmup=args.warmup,
                                 device=args.device, forward_shapes=["run"])
    timing_defaults(options)
    return shape, seq_lens, options


def run_bench(args: argparse.Namespace, rest: list[str]) -> None:
    if rest:
        raise ValueError(f"unrecognised arguments: {' '.join(rest)}")
    shape, seq_lens, options = bench_config(args)
    device = torch.device(args.device)
    name = args.model_config if args.model_config in PRESETS else Path(args.model_config).name
    name += " (tiny shapes)" if args.tiny else ""
    described = (f"{name}: H {shape.hidden}, V {shape.vocab}"
                 + (f", softcap {shape.softcap:g}" if shape.softcap is not None else ""))
    table, forward_table = bench_shape("run", shape, options, device, record_cpu=True)
    report = [
        *report_heading("prefops bench", args.tiny, device), "", *setup_lines(options, device, record_cpu=True), "",
        f"{described}; table batch: {shape.pairs} pairs × {shape.tokens} tokens.", "",
        "## Forward + backward", "", markdown_table(TABLE_HEADERS, table), "",
        "## Forward only (per-token log-probs)", "", markdown_table(FORWARD_HEADERS, forward_table),
    ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if seq_lens:
        sweep_shape = dataclasses.replace(shape, pairs=args.sweep_pairs)
        series = sweep(sweep_shape, seq_lens, options, device)
        title = f"{described}, {args.sweep_pairs} pair(s), {environment_line(device).split(' | ')[0]}"
        plots = plot_sweep(series, args.out_dir, title)
        report += ["", f"## Against sequence length ({args.sweep_pairs} pair(s) per batch)", "",
                   sweep_table(series, seq_lens), "", "Plots: " + ", ".join(str(path) for path in plots)]
    text = "\n".join(report)
    print(text)
    write_report(text, args.out_dir / "report.md")
    print(f"report written to {args.out_dir / 'report.md'}", file=sys.stderr)
