"""Loss-type benchmark (issue #3): sigmoid, ipo, simpo, orpo and kto forward+backward at shape A.

    python benchmarks/bench_losses.py --out losses.md             # one GPU, one process
    python benchmarks/bench_losses.py --device cpu --tiny         # smoke test of the script's logic

Same data as bench_core.py (prefops.tools.bench.make_problem: bf16, logit std about 4,
65 % of the tokens counted, reference log-probs = the policy's own + N(0, 10²)),
the same floor (three GEMMs over the counted tokens), beta 0.1 for every loss.
Rows per loss type:
  naive         bf16 logits materialised, fp32 log_softmax, gather, per-sequence sums, then the
                prefops loss function (pairwise_loss / kto_loss): the same head as the prefops rows
  logps         prefops.linear_logprobs + prefops.sequence_sum, head = sum of the log-probs (lean):
                the core op alone, so that lean - logps is the time the loss head adds
  lean          prefops.PreferenceLoss(loss_type) / prefops.UnpairedLoss("kto"), strategy lean
  logps-budget  prefops.sequence_objective with the trivial head, budget strategy (1 GB)
  budget        the lean row's module with strategy budget, budget 1 GB
  logps-default, default   the same two under prefops.settings' default strategy (auto)
  liger         Liger-Kernel's fused module where it has the loss type (liger_kernel.chunked_loss)
KTO: the 2P sequences are 2P completions, labels [True] * P + [False] * P, reference
point z_0 fixed at KTO_KL (as when it is estimated beforehand and averaged over ranks).
Every row's loss, dh and dW are checked against the same loss computed from fp32
logits in token chunks (float64 for an fp32 problem), so a fast-but-wrong row shows;
where Liger's loss differs from ours (no precomputed reference, mean log-probs) its
row is checked against its own definition, said in the note column.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

import prefops
from bench_core import SHAPES, TINY_SHAPES
from prefops.tools.bench import (BETA, IGNORE_INDEX, Problem, Skipped, add_choices_option, add_timing_options, attempt,
                           build_floor, report_heading, finish_report, fmt_gb, fmt_ms, make_problem, markdown_table,
                           median_ms, naive_token_logps, peak_during, reference_outputs, relative_error,
                           require_device, timing_defaults)
from prefops.losses import REFERENCE_FREE, kto_loss, pairwise_loss

LOSS_TYPES = ("sigmoid", "ipo", "simpo", "orpo", "kto")
SIMPO_GAMMA = 0.5  # prefops' simpo_gamma and Liger's gamma: both subtract it from β(s_w/n_w - s_l/n_l)
KTO_KL = 1.0       # KTO's reference point z_0 (nats), fixed
BUDGET = "1GB"
PARAMS = {"simpo": {"simpo_gamma": SIMPO_GAMMA}}


# ---------------------------------------------------------------- heads: the loss from per-sequence sums

def kto_labels(p: Problem) -> torch.Tensor:
    """[True] * P + [False] * P: the chosen rows are the desirable completions."""
    return torch.arange(2 * p.pairs, device=p.targets.device) < p.pairs


def loss_head(loss_type: str, p: Problem, *, zero_ref: bool = False, mean_logps: bool = False) -> Callable:
    """head(sequence log-prob sums [2P], completion lengths [2P]) -> the batch loss, as prefops computes it.

    zero_ref: reference log-probs 0 (Liger without a reference model); mean_logps: KTO on
    per-token means (Liger's KTO with average_log_prob=True)."""
    labels = kto_labels(p)

    def head(logps, counts):
        reference = torch.zeros_like(logps) if zero_ref else p.ref.to(logps.dtype)
        if loss_type == "kto":
            policy = logps / counts if mean_logps else logps
            return kto_loss(policy, reference, labels, beta=BETA, kl=KTO_KL)[0].mean()
        pairs = p.pairs
        refs = (None, None) if loss_type in REFERENCE_FREE else (reference[:pairs], reference[pairs:])
        losses, _ = pairwise_loss(logps[:pairs], logps[pairs:], *refs, loss_type=loss_type, beta=BETA,
                                  chosen_lengths=counts[:pairs], rejected_lengths=counts[pairs:],
                                  **PARAMS.get(loss_type, {}))
        return losses.mean()
    return head


def logps_head(loss_type: str, p: Problem) -> Callable:
    """The trivial head of the logps-only rows: the sum of every counted token's log-prob (gradient 1)."""
    return lambda logps, counts: logps.sum()


# ---------------------------------------------------------------- rows: each builds the closure computing the loss

def build_naive(loss_type: str, p: Problem):
    head, counts = loss_head(loss_type, p), p.mask.sum(-1).float()
    return lambda: head(naive_token_logps(p.hidden, p.weight, p.targets).sum(-1), counts)


def build_logps(loss_type: str, p: Problem):
    sequences, tokens, width = p.hidden.shape
    mask = p.mask

    def loss():
        logp = prefops.linear_logprobs(p.hidden.view(-1, width), p.weight, p.targets.view(-1),
                                       ignore_index=IGNORE_INDEX)
        return prefops.sequence_sum(logp.view(sequences, tokens), mask).sum()
    return loss


def build_logps_objective(strategy: Optional[str]):
    """The logps-only row of a sequence_objective strategy (None: prefops.settings' default)."""
    def build(loss_type: str, p: Problem):
        sequences, tokens, width = p.hidden.shape
        index = torch.arange(sequences, device=p.hidden.device)
        # The loss row's own groups (pairs, or single completions for KTO), so both runs chunk alike.
        groups = index[:, None] if loss_type == "kto" else torch.stack([index[:p.pairs], index[p.pairs:]], 1)

        def loss():
            return prefops.sequence_objective(
                p.hidden.view(-1, width), p.weight, p.targets.view(-1), groups=groups,
                seq_ids=index.repeat_interleave(tokens), head=lambda logps, group_index, stats: logps.sum(),
                ignore_index=IGNORE_INDEX, strategy=strategy, budget=BUDGET if strategy == "budget" else None,
            ).loss
        return loss
    return build


def build_prefops(strategy: str):
    def build(loss_type: str, p: Problem):
        budget = BUDGET if strategy == "budget" else None
        if loss_type == "kto":
            module = prefops.UnpairedLoss("kto", beta=BETA, ignore_index=IGNORE_INDEX, strategy=strategy,
                                          budget=budget)
            labels = kto_labels(p)
            return lambda: module(p.hidden, p.weight, p.targets, labels=labels, ref_logps=p.ref, kl=KTO_KL)[0]
        module = prefops.PreferenceLoss(loss_type, beta=BETA, ignore_index=IGNORE_INDEX, strategy=strategy,
                                        budget=budget, **PARAMS.get(loss_type, {}))
        refs = {} if loss_type in REFERENCE_FREE else dict(ref_chosen_logps=p.ref[:p.pairs],
                                                           ref_rejected_logps=p.ref[p.pairs:])
        return lambda: module(p.hidden, p.weight, p.targets, **refs)[0]
    return build


# Where Liger's definition differs from ours; the liger row is checked against its own definition.
LIGER_NOTES = {
    "sigmoid": "LigerFusedLinearDPOLoss; takes no precomputed ref logps: runs and is checked with ref = 0",
    "simpo": "LigerFusedLinearSimPOLoss(gamma, compute_nll_loss=False): same loss as ours",
    "orpo": "LigerFusedLinearORPOLoss (NLL over all chosen tokens + β odds term): same loss as ours",
    "kto": "LigerFusedLinearKTOLoss; no precomputed ref logps: ref = 0 and per-token mean log-probs "
           "(average_log_prob=True; sums with ref 0 saturate the sigmoid), checked as such",
}


def build_liger(loss_type: str, p: Problem):
    try:
        from liger_kernel import chunked_loss as liger
    except ModuleNotFoundError as error:
        if error.name != "liger_kernel":
            raise
        raise Skipped("liger-kernel not installed") from None
    # Liger's compiled chunks are its GPU path; the CPU smoke test runs its eager path (same math).
    compiled = p.hidden.is_cuda
    common = dict(ignore_index=IGNORE_INDEX, beta=BETA, compiled=compiled)
    if loss_type == "kto":
        module = liger.LigerFusedLinearKTOLoss(use_ref_model=False, average_log_prob=True, **common)
        labels, kl = kto_labels(p), torch.tensor(KTO_KL, device=p.hidden.device)
        return lambda: module(p.hidden, p.weight, p.targets, preference_labels=labels, kl=kl)[0]
    if loss_type == "simpo":
        module = liger.LigerFusedLinearSimPOLoss(gamma=SIMPO_GAMMA, compute_nll_loss=False, **common)
    elif loss_type == "orpo":
        module = liger.LigerFusedLinearORPOLoss(compute_nll_loss=True, **common)
    else:
        try:
            # use_ref_model=False (reference 0) keeps its work to the same three GEMMs as every other row.
            module = liger.LigerFusedLinearDPOLoss(use_ref_model=False, average_log_prob=False, loss_type=loss_type,
                                                   **common)
        except (ValueError, NotImplementedError):
            raise Skipped(f"LigerFusedLinearDPOLoss has no loss_type {loss_type!r}") from None
    return lambda: module(p.weight, p.hidden, p.targets)[0]  # (loss, aux outputs)


def liger_head(loss_type: str, p: Problem):
    return loss_head(loss_type, p, zero_ref=True, mean_logps=loss_type == "kto")


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    build: Callable[[str, Problem], Callable[[], torch.Tensor]]
    head: Callable[[str, Problem], Callable]  # the loss the row computes, for its error check
    baseline: Optional[str] = None  # the logps-only row whose time the head column subtracts
    note: Callable[[str], str] = lambda loss_type: ""


ROWS = {
    "naive": Row("naive PyTorch", build_naive, loss_head, note=lambda t: "bf16 logits materialised"),
    "logps": Row("prefops logps only (lean)", build_logps, logps_head,
                 note=lambda t: "linear_logprobs + sequence_sum, head = Σ logps"),
    "lean": Row("prefops lean", build_prefops("lean"), loss_head, baseline="logps",
                note=lambda t: "UnpairedLoss('kto')" if t == "kto" else f"PreferenceLoss({t!r})"),
    "logps-budget": Row("prefops logps only (budget 1 GB)", build_logps_objective("budget"), logps_head,
                        note=lambda t: "sequence_objective, head = Σ logps"),
    "budget": Row("prefops budget 1 GB", build_prefops("budget"), loss_head, baseline="logps-budget"),
    "logps-default": Row("prefops logps only (default strategy)", build_logps_objective(None), logps_head,
                         note=lambda t: "sequence_objective, head = Σ logps"),
    "default": Row("prefops default strategy", build_prefops(None), loss_head, baseline="logps-default"),
    "liger": Row("Liger", build_liger, liger_head, note=lambda t: LIGER_NOTES.get(t, "")),
}


# ---------------------------------------------------------------- measuring

def exact_outputs(p: Problem, head, dtype):
    """(loss, dh, dW) of head over per-sequence sums from logits in `dtype`: the yardstick."""
    return reference_outputs(p, dtype, loss_of=lambda sums: head(sums, p.mask.sum(-1).to(dtype)))


@dataclasses.dataclass
class Result:
    key: str
    ms: Optional[float] = None
    beyond: Optional[int] = None  # bytes beyond the gradients (CUDA only)
    errors: Optional[tuple] = None  # loss, dh, dW relative errors
    reason: str = ""  # why the row did not run


def measure(build, p: Problem, expected, device, args):
    loss_fn = build()

    def step():
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    ms = median_ms(step, device=device, reps=args.reps, warmup=args.warmup, before=p.clear_gradients)
    p.clear_gradients()
    loss, peak = peak_during(step, device=device)
    errors = None
    if expected is not None:
        errors = tuple(float("inf") if value is None else relative_error(value, exact)
                       for value, exact in zip((loss, p.hidden.grad, p.weight.grad), expected))
    p.clear_gradients()
    return ms, None if peak is None else peak - p.gradient_bytes, errors


def measure_loss_type(loss_type: str, p: Problem, rows, device, args) -> list[Result]:
    """One Result per row key, in order; the reference of each distinct head is computed once."""
    exact_dtype = torch.float64 if p.hidden.dtype in (torch.float32, torch.float64) else torch.float32
    results, expected = [], {}
    for key in rows:
        row = ROWS[key]
        head_kind = row.head
        if head_kind not in expected:
            head = head_kind(loss_type, p)
            expected[head_kind], reason = attempt(lambda: exact_outputs(p, head, exact_dtype))
            if reason:
                print(f"  exact reference for {key}: {reason}", file=sys.stderr, flush=True)
        measured, reason = attempt(lambda: measure(lambda: row.build(loss_type, p), p, expected[head_kind],
                                                   device, args))
        results.append(Result(key, reason=reason or "") if measured is None else Result(key, *measured))
        print(f"  [{loss_type}] {row.label}: " + (reason or f"{fmt_ms(results[-1].ms)} ms"), file=sys.stderr,
              flush=True)
    return results


def head_cell(result: Result, by_key: dict) -> str:
    """Time the loss head adds over the row's logps-only baseline: '+ms (ratio×)'."""
    baseline = by_key.get(ROWS[result.key].baseline)
    if result.ms is None or baseline is None or baseline.ms is None:
        return "—"
    return f"{result.ms - baseline.ms:+.2f} ({result.ms / baseline.ms:.3f}×)"


def table_rows(loss_type: str, results: list[Result], floor_ms) -> list[list[str]]:
    by_key = {result.key: result for result in results}
    table = []
    for result in results:
        row = ROWS[result.key]
        if result.ms is None:
            table.append([loss_type, row.label, "—", "—", "—", "—", "—", result.reason])
            continue
        errors = "n/a" if result.errors is None else " / ".join(f"{e:.1e}" for e in result.errors)
        table.append([loss_type, row.label, fmt_ms(result.ms), f"{result.ms / floor_ms:.2f}×" if floor_ms else "n/a",
                      fmt_gb(result.beyond), head_cell(result, by_key), errors, row.note(loss_type)])
    return table


HEADERS = ["loss type", "row", "median ms", "× floor", "GB beyond grads", "head ms over logps-only",
           "loss / dh / dW rel err", "note"]


def bench_shape(name: str, shape, args, device, dtype=torch.bfloat16) -> list[list[str]]:
    p = make_problem(shape, device, dtype=dtype)
    counted = int(p.mask.sum())
    print(f"[{name}] {shape}, {counted} counted tokens of {p.targets.numel()}", file=sys.stderr, flush=True)
    floor_ms, reason = attempt(lambda: median_ms(build_floor(p), device=device, reps=args.reps, warmup=args.warmup))
    table = [["—", f"floor: 3 GEMMs over counted tokens (shape {name})", fmt_ms(floor_ms),
              "1.00×" if floor_ms else "n/a", "—", "—", "—", reason or ""]]
    for loss_type in args.loss_types:
        table += table_rows(loss_type, measure_loss_type(loss_type, p, args.rows, device, args), floor_ms)
    return table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_choices_option(parser, "--loss-types", LOSS_TYPES)
    add_choices_option(parser, "--rows", ROWS)
    add_choices_option(parser, "--shapes", SHAPES, "A")
    add_timing_options(parser)
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    timing_defaults(args)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = require_device(args)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    table = []
    for name in args.shapes:
        table += bench_shape(name, shapes[name], args, device)
    report = "\n".join([
        *report_heading("prefops loss-type benchmark", args.tiny, device), "",
        f"Forward + backward from final hidden states and lm_head; data as bench_core.py; beta {BETA}, "
        f"simpo_gamma {SIMPO_GAMMA}, KTO: chosen rows desirable, rejected rows undesirable, z_0 = {KTO_KL} fixed; "
        f"median of {args.reps} reps after {args.warmup} warm-up"
        + ("; CUDA-event timing" if device.type == "cuda" else "; wall-clock timing, no memory figures") + ".",
        "Shapes: " + "; ".join(f"{n}: {s.pairs} pairs × {s.tokens} tokens, H {s.hidden}, V {s.vocab}"
                               for n, s in shapes.items() if n in args.shapes) + ".",
        "Head ms = the row's time minus its logps-only baseline's (lean: linear_logprobs + sequence_sum; budget "
        "and default: sequence_objective), same trivial head Σ logps. Relative errors are against the row's own "
        "loss computed from chunked fp32 logits on the same inputs (the naive row's own error is its bf16 logits).",
        "",
        markdown_table(HEADERS, table),
    ])
    finish_report(report, args.out)


if __name__ == "__main__":
    main()
