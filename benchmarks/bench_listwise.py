"""Listwise benchmark: K responses per prompt trained at once, forward+backward from final hidden states.

    python benchmarks/bench_listwise.py --out results.md        # one GPU (the issue's shape)
    python benchmarks/bench_listwise.py --device cpu --tiny     # smoke test of the script's logic

Shape: 2 prompts × K = 4 responses × 1024 tokens, H 4096, V 128256, with the
core benchmark's data (prefops.tools.bench.make_problem: bf16, the same prompt and padding
fractions, logit scale and reference noise), the 8 sequences read list-major
(sequence p * K + k is response k of prompt p) and random scores per response.
Each row is timed against the floor (the three GEMMs over the counted tokens)
and its loss and gradients are checked against a chunked fp32-logit computation.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from prefops.tools.bench import (GIB, Problem, Row, Shape, add_choices_option, add_timing_options, attempt, build_floor,
                           report_heading, exact_sequence_logps, finish_report, fmt_gb, fmt_ms, make_problem,
                           markdown_table, measure_row, median_ms, naive_token_logps, require_device,
                           row_note, timing_defaults, token_chunks)
from prefops.listwise import ListwiseLoss
from prefops.losses.listwise import LISTWISE_LOSSES, listwise_loss

BETA = 0.1
RESPONSES = 4
SHAPE = Shape(pairs=RESPONSES, tokens=1024, hidden=4096, vocab=128256)  # 2 prompts × 4 responses = 8 sequences
TINY_SHAPE = Shape(pairs=RESPONSES, tokens=64, hidden=64, vocab=1000)


@dataclasses.dataclass(frozen=True)
class Lists:
    scores: torch.Tensor  # [P, K] fp32, larger = better
    loss_type: str

    def loss(self, sequence_logps, ref):
        """Mean listwise loss from per-sequence log-probs [S] laid out list-major."""
        shape = self.scores.shape
        return listwise_loss(sequence_logps.view(shape), ref.view(shape), scores=self.scores,
                             loss_type=self.loss_type, beta=BETA)[0].mean()


def builders(lists: Lists):
    def naive(p: Problem):
        return lambda: lists.loss(naive_token_logps(p.hidden, p.weight, p.targets, p.softcap).sum(-1), p.ref)

    def compiled(p: Problem):
        fn = torch.compile(lambda h, w, t, r: lists.loss(naive_token_logps(h, w, t, p.softcap).sum(-1), r))
        return lambda: fn(p.hidden, p.weight, p.targets, p.ref)

    def fused(p: Problem):
        module = ListwiseLoss(lists.loss_type, beta=BETA)
        return lambda: module(p.hidden, p.weight, p.targets, scores=lists.scores, ref_logps=p.ref)[0]

    return {
        "naive": Row("naive PyTorch + listwise_loss", naive),
        "compile": Row("torch.compile(naive)", compiled, compiled=True),
        "default": Row("prefops ListwiseLoss default", fused, reports_path=True),
        "lean": Row("prefops ListwiseLoss lean", fused, {"strategy": "lean"}, reports_path=True),
        "budget": Row("prefops ListwiseLoss budget 1 GB", fused, {"strategy": "budget", "budget": "1GB"},
                      reports_path=True),
    }


def reference_outputs(p: Problem, lists: Lists):
    """(loss, dh, dW) from fp32 logits in token chunks: d loss / d sequence logp pushed through each chunk."""
    sequence_logps = exact_sequence_logps(p.hidden, p.weight, p.targets, p.softcap).requires_grad_()
    loss = lists.loss(sequence_logps, p.ref)
    (grad_sequence,) = torch.autograd.grad(loss, sequence_logps)
    token_grads = grad_sequence.repeat_interleave(p.targets.shape[1])
    hidden, targets = p.hidden.detach().view(-1, p.hidden.shape[-1]), p.targets.view(-1)
    weight = p.weight.detach().float().requires_grad_()
    dh = torch.empty(hidden.shape, device=hidden.device)
    for chunk in token_chunks(targets.numel()):
        rows = hidden[chunk].float().requires_grad_()
        naive_token_logps(rows, weight, targets[chunk], p.softcap).backward(token_grads[chunk])
        dh[chunk] = rows.grad
    return loss.detach(), dh.view(p.hidden.shape), weight.grad


def make_lists_problem(shape: Shape, device) -> tuple[Problem, torch.Tensor]:
    """The core benchmark's problem at `shape` read as lists of RESPONSES, and random scores [prompts, K]."""
    p = make_problem(shape, device)
    prompts = 2 * shape.pairs // RESPONSES
    return p, torch.randn(prompts, RESPONSES, generator=torch.Generator().manual_seed(1)).to(device)


def run(args, device):
    shape = TINY_SHAPE if args.tiny else SHAPE
    p, scores = make_lists_problem(shape, device)
    prompts = scores.shape[0]
    counted = int(p.mask.sum())
    print(f"{prompts} prompts × {RESPONSES} responses, {shape}, {counted} counted tokens", file=sys.stderr)
    floor_ms, reason = attempt(lambda: median_ms(build_floor(p), device=device, reps=args.reps, warmup=args.warmup))
    table = [["floor: 3 GEMMs over counted tokens", "—", fmt_ms(floor_ms), "1.00×" if floor_ms else "n/a",
              "—", "—", "—", "—", reason or ""]]
    for loss_type in args.loss_types:
        lists = Lists(scores, loss_type)
        expected, reason = attempt(lambda: reference_outputs(p, lists))
        if reason:
            print(f"  fp32 reference for {loss_type}: {reason}", file=sys.stderr, flush=True)
        rows = builders(lists)
        for key in args.rows:
            row = rows[key]
            result, reason = attempt(lambda: measure_row(row, p, expected, device, args,
                                                         record_cpu=device.type == "cpu"))
            if result is None:
                table.append([row.label, loss_type, "—", "—", "—", "—", "—", "—", reason])
            else:
                ms, beyond, errors = result
                ratio = f"{ms / floor_ms:.2f}×" if floor_ms else "n/a"
                table.append([row.label, loss_type, fmt_ms(ms), ratio, fmt_gb(beyond), *errors, row_note(row)])
            print("  " + " | ".join(table[-1]), file=sys.stderr, flush=True)
    header = [
        *report_heading("prefops listwise benchmark", args.tiny, device),
        "",
        f"{prompts} prompts × {RESPONSES} responses × {shape.tokens} tokens, H {shape.hidden}, V {shape.vocab}; "
        f"the core benchmark's data; beta {BETA}, mean over lists; median of {args.reps} reps after "
        f"{args.warmup} warm-up. Memory = peak during fwd+bwd beyond the inputs and the gradients "
        f"(GB = {GIB} bytes); errors against chunked fp32 logits.",
    ]
    report = "\n".join(header) + "\n\n" + markdown_table(
        ["row", "loss_type", "median ms", "× floor", "GB beyond grads", "loss rel err", "dh rel err", "dW rel err",
         "note"], table)
    finish_report(report, args.out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_choices_option(parser, "--rows", ("naive", "compile", "default", "lean", "budget"))
    add_choices_option(parser, "--loss-types", LISTWISE_LOSSES, "plackett_luce,lipo_lambda")
    add_timing_options(parser, "tiny shape, to smoke-test the script")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    if "pro" in args.loss_types:
        parser.error("--loss-types: 'pro' needs response lengths, which this script does not pass")
    timing_defaults(args)
    return args


def main(argv=None):
    args = parse_args(argv)
    run(args, require_device(args))


if __name__ == "__main__":
    main()
