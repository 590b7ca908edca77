"""Core-op benchmark: DPO (sigmoid, beta 0.1) forward+backward from final hidden states and lm_head.

    python benchmarks/bench_core.py --out results.md            # one GPU, one process
    python benchmarks/bench_core.py --device cpu --tiny         # smoke test of the script's logic

Every row gets the same data and is compared with the floor (the three GEMMs
any exact method must run over the counted tokens), and its loss and
gradients are checked against an fp32 version of the naive row so a
fast-but-wrong row shows.
See benchmarks/README.md for setting up a GPU box.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import prefops
from common import Skipped, attempt, environment_line, markdown_table, median_ms, peak_during, relative_error

BETA = 0.1
IGNORE_INDEX = -100
PROMPT_FRACTION, PADDING_FRACTION = 0.10, 0.25
LOGIT_STD = 4.0
# Reference log-probs are the policy's own sequence log-probs plus this much
# noise: as in real DPO the policy starts near the reference, so the sigmoid
# is not saturated (beta * margin has std ~1.4) and every pair has a gradient.
REFERENCE_NOISE = 10.0
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Shape:
    pairs: int
    tokens: int
    hidden: int
    vocab: int


SHAPES = {
    "A": Shape(pairs=4, tokens=1024, hidden=4096, vocab=128256),
    "L": Shape(pairs=1, tokens=16384, hidden=4096, vocab=128256),
    "Q": Shape(pairs=8, tokens=512, hidden=3584, vocab=152064),
}
TINY_SHAPES = {
    "A": Shape(pairs=4, tokens=64, hidden=64, vocab=1000),
    "L": Shape(pairs=1, tokens=512, hidden=64, vocab=1000),
    "Q": Shape(pairs=8, tokens=32, hidden=48, vocab=1200),
}


@dataclasses.dataclass(frozen=True)
class Problem:
    """A padded batch [2P, T] stacked as [chosen of every pair; rejected of every pair]."""
    hidden: torch.Tensor   # [2P, T, H] bf16 leaf
    weight: torch.Tensor   # [V, H] bf16 leaf
    targets: torch.Tensor  # [2P, T] long, IGNORE_INDEX on prompt and padding
    ref: torch.Tensor      # [2P] fp32 reference sequence log-probs

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


def naive_token_logps(hidden, weight, targets):
    """Materialised logits: bf16 GEMM, fp32 log_softmax, gather; 0 at ignored tokens."""
    logp = torch.log_softmax(F.linear(hidden, weight).float(), dim=-1)
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != IGNORE_INDEX, picked, 0.0)


def make_problem(shape: Shape, device: torch.device, seed: int = 0) -> Problem:
    torch.manual_seed(seed)
    sequences = 2 * shape.pairs
    hidden = torch.randn(sequences, shape.tokens, shape.hidden, device=device, dtype=torch.bfloat16)
    weight = torch.randn(shape.vocab, shape.hidden, device=device, dtype=torch.bfloat16)
    weight.mul_(LOGIT_STD / math.sqrt(shape.hidden))
    targets = torch.randint(0, shape.vocab, (sequences, shape.tokens), device=device)
    targets[:, : int(PROMPT_FRACTION * shape.tokens)] = IGNORE_INDEX
    targets[:, shape.tokens - int(PADDING_FRACTION * shape.tokens):] = IGNORE_INDEX
    ref = fp32_sequence_logps(hidden, weight, targets)
    ref += REFERENCE_NOISE * torch.randn_like(ref)
    return Problem(hidden.requires_grad_(), weight.requires_grad_(), targets, ref)


def token_chunks(count):
    # fp32 logits of one chunk take 2048 x V x 4 bytes, about 1 GB at V = 128k.
    return [slice(i, i + 2048) for i in range(0, count, 2048)]


@torch.no_grad()
def fp32_sequence_logps(hidden, weight, targets):
    """Per-sequence log-prob sums from fp32 logits, chunked so memory stays far below the naive row's."""
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    weight = weight.float()
    logp = torch.cat([naive_token_logps(flat_hidden[c].float(), weight, flat_targets[c])
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
    return dpo_pair_losses(as_pairs(sequence_logps), as_pairs(ref)).mean()


def naive_loss(hidden, weight, targets, ref):
    return dpo_loss(naive_token_logps(hidden, weight, targets).sum(-1), ref)


# Row builders: each takes a Problem and returns a closure computing the scalar loss.

def build_naive(p: Problem):
    return lambda: naive_loss(p.hidden, p.weight, p.targets, p.ref)


def build_compiled(p: Problem):
    compiled = torch.compile(naive_loss)
    return lambda: compiled(p.hidden, p.weight, p.targets, p.ref)


def build_prefops_tokens(p: Problem):
    sequences, tokens, width = p.hidden.shape
    mask = p.mask

    def loss():
        logp = prefops.linear_logprobs(p.hidden.view(-1, width), p.weight, p.targets.view(-1),
                                       ignore_index=IGNORE_INDEX)
        return dpo_loss(prefops.sequence_sum(logp.view(sequences, tokens), mask), p.ref)
    return loss


def build_prefops_objective(p: Problem):
    if not hasattr(prefops, "sequence_objective"):
        raise Skipped("prefops.sequence_objective not available")
    sequences, tokens, width = p.hidden.shape
    device = p.hidden.device
    seq_ids = torch.arange(sequences, device=device).repeat_interleave(tokens)
    chosen = torch.arange(p.pairs, device=device)
    groups = torch.stack([chosen, chosen + p.pairs], dim=1)
    ref_pairs = as_pairs(p.ref)

    def head(logps, group_index, stats):
        return dpo_pair_losses(logps, ref_pairs[group_index]).sum() / p.pairs

    return lambda: prefops.sequence_objective(
        p.hidden.view(-1, width), p.weight, p.targets.view(-1),
        head=head, seq_ids=seq_ids, groups=groups, ignore_index=IGNORE_INDEX,
    ).loss


def build_liger(p: Problem):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    # Liger takes a reference model (ref_input, ref_weight), not precomputed
    # reference log-probs; use_ref_model=False (reference = 0) keeps its work
    # to the same three GEMMs as every other row.
    loss_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=BETA, use_ref_model=False,
                                      average_log_prob=False, loss_type="sigmoid")
    return lambda: loss_fn(p.weight, p.hidden, p.targets)[0]  # returns (loss, aux outputs)


def cce_token_logps(hidden, weight, targets):
    from cut_cross_entropy import linear_cross_entropy
    # CCE's own kernels are CUDA-only; its torch_compile impl lets the CPU smoke test run the rows.
    impl = "cce" if hidden.is_cuda else "torch_compile"
    return -linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="none", impl=impl)


def build_cce(p: Problem):
    return lambda: dpo_loss(cce_token_logps(p.hidden, p.weight, p.targets).sum(-1), p.ref)


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    build: Callable[[Problem], Callable[[], torch.Tensor]]
    settings: dict = dataclasses.field(default_factory=dict)  # prefops.settings around forward and backward
    zero_ref: bool = False  # cannot take precomputed reference log-probs: runs, and is checked, with ref = 0
    note: str = ""


ROWS = {
    "naive": Row("naive PyTorch", build_naive),
    "compile": Row("torch.compile(naive)", build_compiled),
    "lean": Row("prefops lean", build_prefops_tokens, {"strategy": "lean"}),
    "budget": Row("prefops budget 1 GB", build_prefops_objective, {"strategy": "budget", "budget": "1GB"},
                  note="sequence_objective"),
    "liger": Row("Liger LigerFusedLinearDPOLoss", build_liger, zero_ref=True,
                 note="takes no precomputed ref logps: runs and is checked with ref = 0"),
    "cce": Row("CCE linear_cross_entropy", build_cce, note="reduction='none', default filter_eps"),
}


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
        "naive forward (logps)": lambda: naive_token_logps(flat_hidden, weight, flat_targets),
        "CCE forward (logps)": lambda: cce_token_logps(flat_hidden, weight, flat_targets),
        "prefops forward (linear_logprobs, no_grad)":
            lambda: prefops.linear_logprobs(flat_hidden, weight, flat_targets, ignore_index=IGNORE_INDEX),
    }


def reference_outputs(p: Problem):
    """(loss, dh, dW) from fp32 logits, in token chunks: the yardstick for every row, naive included.

    The naive row rounds the logits to bf16, which alone moves a long
    sequence's log-prob sum by about 1e-2 relative; an fp32 yardstick keeps
    that from passing for an error in the rows that avoid the rounding.
    """
    sequence_logps = fp32_sequence_logps(p.hidden, p.weight, p.targets).requires_grad_()
    loss = dpo_loss(sequence_logps, p.ref)
    loss.backward()
    # d loss / d token logp is its sequence's gradient; push it through each chunk's logits.
    token_grads = sequence_logps.grad.repeat_interleave(p.targets.shape[1])
    hidden, targets = p.hidden.detach().view(-1, p.hidden.shape[-1]), p.targets.view(-1)
    weight = p.weight.detach().float().requires_grad_()
    dh = torch.empty(hidden.shape, device=hidden.device)
    for c in token_chunks(targets.numel()):
        rows = hidden[c].float().requires_grad_()
        naive_token_logps(rows, weight, targets[c]).backward(token_grads[c])
        dh[c] = rows.grad
    return loss.detach(), dh.view(p.hidden.shape), weight.grad


def measure_row(row: Row, p: Problem, expected, device, args):
    """Median fwd+bwd time, memory beyond the gradients, and relative errors against `expected`."""
    loss_fn = row.build(p)

    def step():
        with prefops.settings(**row.settings):
            loss = loss_fn()
            loss.backward()
        return loss.detach()

    ms = median_ms(step, device=device, reps=args.reps, warmup=args.warmup, before=p.clear_gradients)
    p.clear_gradients()
    loss, peak = peak_during(step, device=device)
    beyond = None if peak is None else peak - p.gradient_bytes
    errors = ["n/a"] * 3
    if expected is not None:
        actual = (loss, p.hidden.grad, p.weight.grad)
        errors = ["no grad" if a is None else f"{relative_error(a, e):.1e}" for a, e in zip(actual, expected)]
    p.clear_gradients()
    return ms, beyond, errors


def fmt_ms(ms):
    return "—" if ms is None else f"{ms:.2f}"


def fmt_gb(nbytes):
    return "n/a" if nbytes is None else f"{nbytes / GIB:.2f}"


def bench_shape(name: str, shape: Shape, args, device):
    p = make_problem(shape, device)
    counted = int(p.mask.sum())
    print(f"[{name}] {shape}, {counted} counted tokens of {p.targets.numel()}", file=sys.stderr, flush=True)
    floor_ms, reason = attempt(lambda: median_ms(build_floor(p), device=device, reps=args.reps, warmup=args.warmup))
    table = [[name, "floor: 3 GEMMs over counted tokens", fmt_ms(floor_ms), "1.00×" if floor_ms else "n/a",
              "—", "—", "—", "—", reason or ""]]
    print(f"  floor: {fmt_ms(floor_ms)} ms {reason or ''}", file=sys.stderr, flush=True)

    expected = {}
    for key in args.rows:
        row = ROWS[key]
        problem = dataclasses.replace(p, ref=torch.zeros_like(p.ref)) if row.zero_ref else p
        if row.zero_ref not in expected:
            expected[row.zero_ref], reason = attempt(lambda: reference_outputs(problem))
            if reason:
                print(f"  fp32 reference for the error columns: {reason}", file=sys.stderr, flush=True)
        result, reason = attempt(lambda: measure_row(row, problem, expected[row.zero_ref], device, args))
        if result is None:
            table.append([name, row.label, "—", "—", "—", "—", "—", "—", reason])
        else:
            ms, beyond, errors = result
            ratio = f"{ms / floor_ms:.2f}×" if floor_ms else "n/a"
            table.append([name, row.label, fmt_ms(ms), ratio, fmt_gb(beyond), *errors, row.note])
        print("  " + " | ".join(table[-1][1:]), file=sys.stderr, flush=True)

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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="A,L,Q", help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    parser.add_argument("--forward-shapes", default="A",
                        help="shapes that also get the forward-only table ('' for none)")
    parser.add_argument("--reps", type=int, help="timed repetitions per row (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 3 on CUDA, 1 on CPU)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, to smoke-test the script")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.rows = [r for r in args.rows.split(",") if r]
    args.forward_shapes = [s for s in args.forward_shapes.split(",") if s]
    for value, allowed, option in ((args.shapes, SHAPES, "--shapes"), (args.rows, ROWS, "--rows"),
                                   (args.forward_shapes, SHAPES, "--forward-shapes")):
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    on_cuda = args.device == "cuda"
    args.reps = args.reps or (20 if on_cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_cuda else 1)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu --tiny for a smoke test")
    device = torch.device(args.device)
    shapes = TINY_SHAPES if args.tiny else SHAPES

    header = [
        "# prefops core-op benchmark" + (" (TINY SMOKE TEST: timings meaningless)" if args.tiny else ""),
        "",
        environment_line(device),
        "",
        f"DPO sigmoid, beta {BETA}, mean over pairs; bf16 h ~ N(0,1), W scaled for logit std {LOGIT_STD}; "
        f"first {PROMPT_FRACTION:.0%} and last {PADDING_FRACTION:.0%} of every sequence ignored; "
        f"median of {args.reps} reps after {args.warmup} warm-up"
        + ("; CUDA-event timing" if device.type == "cuda" else "; wall-clock timing, no memory figures") + ".",
        "Memory = peak during fwd+bwd beyond the inputs and W.grad + h.grad. "
        "Relative errors are against a chunked fp32-logit computation of the naive math on the same inputs "
        "(the naive row's own error is its bf16 logits).",
        "",
        "Shapes: " + "; ".join(f"{n}: {s.pairs} pairs × {s.tokens} tokens, H {s.hidden}, V {s.vocab}"
                               for n, s in shapes.items() if n in args.shapes),
    ]
    tables, forward_tables = [], []
    for name in args.shapes:
        table, forward_table = bench_shape(name, shapes[name], args, device)
        tables += table
        forward_tables += forward_table

    report = "\n".join(header) + "\n\n## Forward + backward\n\n" + markdown_table(
        ["shape", "row", "median ms", "× floor", "GB beyond grads", "loss rel err", "dh rel err", "dW rel err",
         "note"], tables)
    if forward_tables:
        report += "\n\n## Forward only (per-token log-probs)\n\n" + markdown_table(
            ["shape", "op", "median ms", "× one GEMM over counted tokens", "note"], forward_tables)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
