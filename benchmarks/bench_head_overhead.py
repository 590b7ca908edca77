"""What a loss head adds to the fused pass, counted without a GPU (issue 20 item 6).

    python benchmarks/bench_head_overhead.py                    # bench_losses' loss types, every path
    python benchmarks/bench_head_overhead.py --loss-types all --out heads.md
    python benchmarks/bench_head_overhead.py --loss-types listwise      # every case of LISTWISE

bench_losses times each loss type against a logps-only row on the same fused pass; on a GPU
the difference is the head's tiny kernels, plus, wherever an op needs a value on the host, the
time the GPU idles while the CPU issues what follows it (see prefops.tools.opcount). This
script counts both at a tiny fp32 shape on CPU, per loss type and path:
  calls             head calls in one step (chunked: one per chunk; the others: one)
  ops, syncs / call aten ops one head call launches (views excluded), and those that wait for the device
  step ops, syncs   forward + backward of the loss module minus the logps-only row's on the same path
                    (sequence_objective with the trivial head Σ logps, as bench_losses' logps-budget row)
  µs / call         CPU time of one head call, replayed on its own arguments
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import timeit
from pathlib import Path
from typing import Optional

import torch

import prefops
import prefops.listwise
import prefops.preference
import prefops.unpaired
from bench_losses import IGNORE_INDEX, KTO_KL, LOSS_TYPES, PARAMS, kto_labels
from prefops.preference import BATCH_COUPLED_LOSSES
from prefops.losses import LOSSES, REFERENCE_FREE
from prefops.chunks import budget_bytes_per_logit
from prefops.losses.listwise import LISTWISE_LOSSES
from prefops.tools.bench import BETA, Shape, add_choices_option, finish_report, make_problem, markdown_table
from prefops.tools.options import comma_choices
from prefops.tools.opcount import OpCounter

SHAPE = Shape(pairs=4, tokens=24, hidden=16, vocab=96)
PATHS = ("lean", "sliced", "stored", "chunked")
# What each pairwise loss needs beyond the reference to run (tests/test_head_overhead.py runs them all).
EXTRA = {
    **PARAMS,
    "exo_pair": {"label_smoothing": 0.1},
    "robust": {"label_smoothing": 0.1},
    "sppo": {"preference_probs": torch.linspace(0.6, 0.9, SHAPE.pairs)},
    "modpo": {"modpo_weights": [0.6, 0.4], "chosen_margin_rewards": torch.linspace(-1, 1, SHAPE.pairs),
              "rejected_margin_rewards": torch.linspace(1, -1, SHAPE.pairs)},
}
# Listwise cases: SHAPE's sequences as lists of K = 4, list-major, with (loss type, its parameters,
# labels). Scores are distinct; ranks tie two responses of every list, as graded samples do.
LISTWISE = {
    **{name: (name, {}, "scores") for name in sorted(LISTWISE_LOSSES)},
    "plackett_luce_top2": ("plackett_luce", {"top_k": 2}, "scores"),
    "plackett_luce_ties": ("plackett_luce", {}, "ranks"),
    "pro_ties": ("pro", {}, "ranks"),
    "adpo_soft_ties": ("adpo", {"target": "soft"}, "ranks"),
    "all_pairs_ties": ("all_pairs", {}, "ranks"),
    "all_pairs_orpo_ipo": ("all_pairs", {"pairwise_type": ["orpo", "ipo"], "loss_weights": [1.0, 0.5]}, "scores"),
    "dcg_pairwise_simpo_ties": ("dcg_pairwise", {"pairwise_type": "simpo"}, "ranks"),
}
LIST_SIZE = 4
ALL_TYPES = (*sorted(LOSSES), "kto", *LISTWISE)


def paths_of(loss_type: str) -> tuple:
    """The paths a loss type runs: one coupled across its batch has no chunked head."""
    return ("lean", "sliced") if loss_type in BATCH_COUPLED_LOSSES else PATHS


def strategy_of(path: str, p, loss_type: str = "sigmoid") -> dict:
    """strategy and budget that run `path` at this problem: chunked gets one loss group's rows per chunk."""
    if path in ("lean", "sliced"):
        return dict(strategy=path)
    if path == "stored":
        return dict(strategy="budget", budget="1GB")
    first_group = list(range(LIST_SIZE)) if loss_type in LISTWISE else [0, p.pairs]
    group_rows = int(p.mask[first_group].sum())
    return dict(strategy="budget", budget=group_rows * p.weight.shape[0] * budget_bytes_per_logit(p.weight.dtype))


def list_labels(case: str, p) -> dict:
    """scores or ranks [P, K] of a listwise case."""
    lists = p.hidden.shape[0] // LIST_SIZE
    if LISTWISE[case][2] == "scores":
        return {"scores": torch.linspace(-1, 1, lists * LIST_SIZE).view(lists, LIST_SIZE)}
    return {"ranks": torch.tensor([1, 2, 2, 4]).repeat(lists, 1)}


def loss_step(loss_type: str, p, options: dict):
    """The loss module's step and the function its head goes through (patched to count the calls)."""
    if loss_type in LISTWISE:
        name, params, _ = LISTWISE[loss_type]
        module = prefops.ListwiseLoss(name, beta=BETA, ignore_index=IGNORE_INDEX, **options, **params)
        labels = list_labels(loss_type, p)
        return lambda: module(p.hidden, p.weight, p.targets, ref_logps=p.ref, **labels)[0], prefops.listwise
    if loss_type == "kto":
        module = prefops.UnpairedLoss("kto", beta=BETA, ignore_index=IGNORE_INDEX, **options)
        labels = kto_labels(p)
        return (lambda: module(p.hidden, p.weight, p.targets, labels=labels, ref_logps=p.ref, kl=KTO_KL)[0],
                prefops.unpaired)
    module = prefops.PreferenceLoss(loss_type, beta=BETA, ignore_index=IGNORE_INDEX, **options,
                                    **EXTRA.get(loss_type, {}))
    refs = {} if loss_type in REFERENCE_FREE else dict(ref_chosen_logps=p.ref[:p.pairs],
                                                       ref_rejected_logps=p.ref[p.pairs:])
    return lambda: module(p.hidden, p.weight, p.targets, **refs)[0], prefops.preference


def logps_step(loss_type: str, p, options: dict):
    """bench_losses' logps-only row on the same path: the loss row's groups, head Σ logps."""
    sequences, tokens, width = p.hidden.shape
    index = torch.arange(sequences)
    if loss_type in LISTWISE:
        groups = index.view(-1, LIST_SIZE)
    else:
        groups = index[:, None] if loss_type == "kto" else torch.stack([index[:p.pairs], index[p.pairs:]], 1)
    return lambda: prefops.sequence_objective(
        p.hidden.view(-1, width), p.weight, p.targets.view(-1), groups=groups, seq_ids=index.repeat_interleave(tokens),
        head=lambda logps, group_index, stats: logps.sum(), ignore_index=IGNORE_INDEX, **options).loss


def counted_step(step) -> OpCounter:
    step()  # once first: caches and lazy imports are not the step's
    with OpCounter() as counter:
        step().backward()
    return counter


@contextlib.contextmanager
def captured_heads(module, objective="sequence_objective"):
    """Every head that `module`'s `objective` gets, called under its own OpCounter: [(counter, head, args)]."""
    calls, original = [], getattr(module, objective)

    def patched(*args, head, **kwargs):
        def counted(*head_args):
            with OpCounter() as counter:
                result = head(*head_args)
            calls.append((counter, head, head_args))
            return result
        return original(*args, head=counted, **kwargs)

    setattr(module, objective, patched)
    try:
        yield calls
    finally:
        setattr(module, objective, original)


@dataclasses.dataclass
class Counts:
    path: str  # the path that ran (prefops.strategy.last_path)
    heads: list  # an OpCounter per head call
    step: OpCounter  # the loss module's forward + backward
    baseline: OpCounter  # the logps-only row's on the same path
    us: Optional[float]  # CPU microseconds per head call

    @property
    def step_ops(self) -> int:
        return len(self.step.ops) - len(self.baseline.ops)

    @property
    def step_syncs(self) -> int:
        return len(self.step.syncs) - len(self.baseline.syncs)


def measure(loss_type: str, path: str, p, time_calls: bool = True) -> Counts:
    options = strategy_of(path, p, loss_type)
    step, module = loss_step(loss_type, p, options)
    step()
    with captured_heads(module) as calls:
        step().backward()
    ran = prefops.strategy.last_path()
    total, baseline = counted_step(step), counted_step(logps_step(loss_type, p, options))
    p.clear_gradients()
    microseconds = None
    if time_calls:
        _, head, args = calls[0]
        # The least of several repeats: the CPU is shared, and noise only adds.
        microseconds = 1e6 * min(timeit.repeat(lambda: head(*args), number=50, repeat=5)) / 50
    return Counts(ran, [counter for counter, _, _ in calls], total, baseline, microseconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sets = {"all": list(ALL_TYPES), "listwise": list(LISTWISE)}
    parser.add_argument("--loss-types", default=",".join(LOSS_TYPES),
                        type=lambda text: sets[text] if text in sets else comma_choices(ALL_TYPES)(text),
                        help=f"comma-separated subset of {','.join(ALL_TYPES)}, or all, or listwise "
                             "(default: bench_losses')")
    add_choices_option(parser, "--paths", PATHS)
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    p = make_problem(SHAPE, torch.device("cpu"), dtype=torch.float32)
    table = []
    for loss_type in args.loss_types:
        for path in [path for path in args.paths if path in paths_of(loss_type)]:
            c = measure(loss_type, path, p)
            table.append([loss_type, c.path, len(c.heads), max(len(h.ops) for h in c.heads),
                          max(len(h.syncs) for h in c.heads), c.step_ops, c.step_syncs, f"{c.us:.0f}",
                          f"{c.step.summary()} (logps-only: {c.baseline.summary()})"])
            print(" | ".join(map(str, table[-1])), file=sys.stderr, flush=True)
    report = "\n".join([
        "# Loss-head overhead: ops and host syncs (CPU count)", "",
        f"Shape: {SHAPE.pairs} pairs × {SHAPE.tokens} tokens, H {SHAPE.hidden}, V {SHAPE.vocab}, fp32; beta {BETA}. "
        "Step columns: the loss module's forward + backward minus the logps-only row's on the same path.", "",
        markdown_table(["loss type", "path", "calls", "ops / call", "syncs / call", "step ops over logps",
                        "step syncs over logps", "µs / call (CPU)", "step syncs by op"], table),
    ])
    finish_report(report, args.out)


if __name__ == "__main__":
    main()
