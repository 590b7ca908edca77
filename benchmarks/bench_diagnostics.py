"""Cost of the likelihood diagnostics: forward-only log-probs with and without them.

    python benchmarks/bench_diagnostics.py --out results.md     # one GPU (target: diagnostics add <= 5%)
    python benchmarks/bench_diagnostics.py --device cpu --tiny  # smoke test of the script's logic

Shape A: 4 pairs (8 sequences) x 1024 tokens, H 4096, V 128256, bf16, 65% of the
tokens counted. Rows: one GEMM over the counted tokens (the floor of any exact
forward), prefops.linear_logprobs under no_grad (the forward the diagnostics
ride on), and prefops.linear_diagnostics with top_k = 1, 10 and 64 (entropy,
top-k entropy and mass, sum p^2 and the top-k ids, all from the same pass).
Median of CUDA-event times. The diagnostics are checked against the logits of a
sample of rows, so a fast-but-wrong row shows.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

import prefops
from prefops.diagnostics import linear_diagnostics
from common import (add_timing_options, environment_line, finish_report, markdown_table, median_ms, require_device,
                    timing_defaults)

IGNORE_INDEX = -100
COUNTED_FRACTION = 0.65
LOGIT_STD = 4.0
WARMUP = (5, 1)  # --warmup defaults on CUDA and on CPU


@dataclasses.dataclass(frozen=True)
class Shape:
    sequences: int
    tokens: int
    hidden: int
    vocab: int


SHAPE_A = Shape(sequences=8, tokens=1024, hidden=4096, vocab=128256)
TINY = Shape(sequences=8, tokens=64, hidden=64, vocab=1000)


def make_problem(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(shape.sequences, shape.tokens, shape.hidden, generator=generator).to(device, dtype)
    weight = (torch.randn(shape.vocab, shape.hidden, generator=generator) * LOGIT_STD / shape.hidden ** 0.5).to(
        device, dtype)
    targets = torch.randint(0, shape.vocab, (shape.sequences, shape.tokens), generator=generator)
    # Prompt first, padding last: the counted response is the middle 65% of every sequence.
    prompt = int(shape.tokens * 0.15)
    counted = int(shape.tokens * COUNTED_FRACTION)
    targets[:, :prompt] = IGNORE_INDEX
    targets[:, prompt + counted:] = IGNORE_INDEX
    return hidden, weight, targets.to(device)


def check(hidden, weight, targets, diagnostics, top_k, sample=64):
    """Largest error of entropy / top-k mass / top-k entropy over a sample of counted rows, and
    the fraction of them whose top-k id set equals torch.topk's (fp32 logits of those rows)."""
    counted = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)[:sample]
    z = hidden.reshape(-1, hidden.shape[-1])[counted].float() @ weight.float().t()
    log_p = torch.log_softmax(z, dim=1)
    top_logp, top_ids = log_p.topk(top_k, dim=1)
    mass = top_logp.exp().sum(1)
    q = (top_logp - mass.log()[:, None]).exp()
    expected = {
        "entropy": -(log_p.exp() * log_p).sum(1),
        "top_k_mass": mass,
        "top_k_entropy": -torch.special.xlogy(q, q).sum(1),
    }
    error = max(float((getattr(diagnostics, name).reshape(-1)[counted] - value).abs().max())
                for name, value in expected.items())
    ids = diagnostics.top_k_ids.reshape(-1, top_k)[counted]
    agree = sum(set(a.tolist()) == set(b.tolist()) for a, b in zip(ids, top_ids)) / counted.numel()
    return error, agree


def run(shape: Shape, device: torch.device, reps: int, warmup: int):
    hidden, weight, targets = make_problem(shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    counted_rows = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    h_counted = hidden.reshape(-1, shape.hidden).index_select(0, counted_rows)
    time = lambda fn: median_ms(fn, device=device, reps=reps, warmup=warmup)  # noqa: E731
    rows = []
    with torch.no_grad():
        floor = time(lambda: h_counted @ weight.t())
        rows.append(("one GEMM over the counted tokens (floor)", floor, None, "", ""))
        base = time(lambda: prefops.linear_logprobs(hidden, weight, targets))
        rows.append(("linear_logprobs forward (no diagnostics)", base, None, "", ""))
        for top_k in (1, 10, 64):
            run_once = lambda: linear_diagnostics(hidden, weight, targets, top_k=top_k)  # noqa: E731,B023
            ms = time(run_once)
            error, agree = check(hidden, weight, targets, run_once(), top_k)
            rows.append((f"linear_diagnostics, top_k={top_k}", ms, ms / base - 1, f"{error:.1e}", f"{agree:.0%}"))
    return floor, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_options(parser, "tiny shape (smoke test of the script)", warmup=WARMUP)
    parser.add_argument("--out", type=Path, help="append the results (markdown) to this file")
    args = parser.parse_args(argv)
    device = require_device(args)
    timing_defaults(args, warmup=WARMUP)
    shape = TINY if args.tiny else SHAPE_A
    floor, rows = run(shape, device, args.reps, args.warmup)
    table = markdown_table(
        ["row", "median ms", "x floor", "added to the forward", "max abs error (sample)", "top-k ids = torch.topk"],
        [(name, f"{ms:.3f}", f"{ms / floor:.2f}", "" if extra is None else f"{extra:+.1%}", error, agree)
         for name, ms, extra, error, agree in rows],
    )
    text = (f"### Diagnostics overhead, shape {'tiny' if args.tiny else 'A'} "
            f"({shape.sequences} x {shape.tokens}, H {shape.hidden}, V {shape.vocab}, "
            f"{COUNTED_FRACTION:.0%} counted)\n\n{environment_line(device)}\n\n{table}\n")
    finish_report(text, args.out, append=True)


if __name__ == "__main__":
    main()
