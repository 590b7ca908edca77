"""TDPO benchmark: TDPO2 forward+backward from the policy's and the reference's final hidden states.

    python benchmarks/bench_tdpo.py --out tdpo.md          # one GPU (shape A by default)
    python benchmarks/bench_tdpo.py --device cpu --tiny    # smoke test of the script's logic

Same data as bench_core.py (bf16, logit std about 4, 65% of tokens counted); the
reference model is the policy plus noise. Rows:
  floor   the four GEMMs any exact method needs over the counted tokens: policy logits,
          dh = G W, dW = G^T h, and the reference logits
  naive   both logits tensors materialised (bf16 GEMMs, fp32 log_softmax), per-token KL,
          log-probs, sums, TDPO2
  default PreferenceLoss("tdpo2") under prefops.settings' default strategy (auto)
  prefops PreferenceLoss("tdpo2"): prefops.linear_token_kl, one fused pass (lean)
  budget  PreferenceLoss("tdpo2", strategy="budget"): whole pairs' policy and reference logits
          materialised within prefops.settings().budget (default 1 GiB), gradient formed in place
Each row's loss and gradients are checked against a chunked fp32-logit computation.
Target (issue #5): prefops <= 1.7x the floor with <= 0.5 GB beyond the gradients.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import prefops
from bench_core import SHAPES, TINY_SHAPES
from prefops.tools.bench import (IGNORE_INDEX, add_choices_option, add_timing_options, attempt,
                           finish_report, fmt_gb, fmt_ms, last_path, make_problem, markdown_table, median_ms,
                           peak_during, relative_error, report_heading, require_device, timing_defaults, token_chunks)

BETA, ALPHA = 0.1, 0.5
REPS = (20, 2)  # --reps defaults on CUDA and on CPU
# Reference = policy + this much relative noise on h and W: a per-token KL of order 1 nat.
REFERENCE_NOISE = 0.3


@dataclasses.dataclass(frozen=True)
class TDPOProblem:
    hidden: torch.Tensor      # [2P, T, H] bf16 leaf
    weight: torch.Tensor      # [V, H] bf16 leaf
    ref_hidden: torch.Tensor  # [2P, T, H] bf16
    ref_weight: torch.Tensor  # [V, H] bf16
    targets: torch.Tensor     # [2P, T]

    @property
    def pairs(self):
        return self.hidden.shape[0] // 2

    @property
    def gradient_bytes(self):
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.weight))

    def clear_gradients(self):
        self.hidden.grad = None
        self.weight.grad = None


def make_tdpo_problem(shape, device):
    core = make_problem(shape, device)
    noise = lambda x: (x.detach() + REFERENCE_NOISE * x.detach().std() * torch.randn_like(x)).to(x.dtype)  # noqa: E731
    return TDPOProblem(core.hidden, core.weight, noise(core.hidden), noise(core.weight), core.targets)


def token_terms(hidden, weight, ref_hidden, ref_weight, targets):
    """Per-token KL(p_ref || p_θ), log p_θ(target), log p_ref(target) from materialised logits (fp32 softmax)."""
    log_p = torch.log_softmax(F.linear(hidden, weight).float(), dim=-1)
    with torch.no_grad():
        log_r = torch.log_softmax(F.linear(ref_hidden, ref_weight).float(), dim=-1)
    counted = targets != IGNORE_INDEX
    kl = torch.where(counted, (log_r.exp() * (log_r - log_p)).sum(-1), 0.0)
    index = targets.clamp_min(0).unsqueeze(-1)
    pick = lambda values: torch.where(counted, values.gather(-1, index).squeeze(-1), 0.0)  # noqa: E731
    return kl, pick(log_p), pick(log_r)


def tdpo_from_sums(kl, logp, ref_logp, pairs):
    """TDPO2 mean loss from per-sequence sums [2P] stacked [chosen; rejected]."""
    split = lambda x: (x[:pairs], x[pairs:])  # noqa: E731
    (kw, kl_), (cw, cl), (rw, rl) = split(kl), split(logp), split(ref_logp)
    return prefops.losses.token_level.tdpo_loss(cw - rw, cl - rl, kw, kl_, beta=BETA, alpha=ALPHA).mean()


def build_naive(p: TDPOProblem):
    def loss():
        terms = token_terms(p.hidden, p.weight, p.ref_hidden, p.ref_weight, p.targets)
        return tdpo_from_sums(*(t.sum(-1) for t in terms), p.pairs)
    return loss


def build_prefops(strategy):
    def build(p: TDPOProblem):
        module = prefops.PreferenceLoss("tdpo2", beta=BETA, tdpo_alpha=ALPHA, ignore_index=IGNORE_INDEX,
                                        strategy=strategy)
        return lambda: module(p.hidden, p.weight, p.targets, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)[0]
    return build


ROWS = {"naive": ("naive PyTorch (two materialised logits)", build_naive),
        "default": ("prefops PreferenceLoss('tdpo2'), default strategy", build_prefops(None)),
        "prefops": ("prefops PreferenceLoss('tdpo2'), lean", build_prefops("lean")),
        "budget": ("prefops PreferenceLoss('tdpo2'), budget", build_prefops("budget"))}


def build_floor(p: TDPOProblem):
    mask = p.targets != IGNORE_INDEX
    counted, ref_counted = p.hidden.detach()[mask], p.ref_hidden[mask]
    weight = p.weight.detach()
    grad_logits = torch.randn(counted.shape[0], weight.shape[0], device=counted.device, dtype=counted.dtype)

    def gemms():
        counted @ weight.t()
        ref_counted @ p.ref_weight.t()
        grad_logits @ weight
        grad_logits.t() @ counted
    return gemms


def reference_outputs(p: TDPOProblem):
    """(loss, dh, dW) with fp32 logits, in token chunks: the yardstick for every row."""
    width = p.hidden.shape[-1]
    flat = lambda x: x.detach().reshape(-1, width)  # noqa: E731
    hidden, ref_hidden, targets = flat(p.hidden), flat(p.ref_hidden), p.targets.reshape(-1)
    weight, ref_weight = p.weight.detach().float(), p.ref_weight.float()
    chunks = token_chunks(targets.numel())
    with torch.no_grad():
        terms = [token_terms(hidden[c].float(), weight, ref_hidden[c].float(), ref_weight, targets[c]) for c in chunks]
    sums = [torch.cat(column).view(p.targets.shape).sum(-1).requires_grad_() for column in zip(*terms)]
    loss = tdpo_from_sums(*sums, p.pairs)
    loss.backward()
    length = p.targets.shape[1]
    grad_kl, grad_logp = (s.grad.repeat_interleave(length) for s in sums[:2])
    weight.requires_grad_()
    dh = torch.empty(hidden.shape, device=hidden.device)
    for c in chunks:
        rows = hidden[c].float().requires_grad_()
        kl, logp, _ = token_terms(rows, weight, ref_hidden[c].float(), ref_weight, targets[c])
        ((kl * grad_kl[c]).sum() + (logp * grad_logp[c]).sum()).backward()
        dh[c] = rows.grad
    return loss.detach(), dh.view(p.hidden.shape), weight.grad


def measure(build, p, expected, device, args):
    loss_fn = build(p)

    def step():
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    ms = median_ms(step, device=device, reps=args.reps, warmup=args.warmup, before=p.clear_gradients)
    p.clear_gradients()
    loss, peak = peak_during(step, device=device)
    errors = ["n/a"] * 3
    if expected is not None:
        errors = [f"{relative_error(a, e):.1e}" for a, e in zip((loss, p.hidden.grad, p.weight.grad), expected)]
    p.clear_gradients()
    return ms, None if peak is None else peak - p.gradient_bytes, errors


def bench_shape(name, shape, args, device):
    p = make_tdpo_problem(shape, device)
    counted = int((p.targets != IGNORE_INDEX).sum())
    print(f"[{name}] {shape}, {counted} counted tokens of {p.targets.numel()}", file=sys.stderr, flush=True)
    floor_ms, reason = attempt(lambda: median_ms(build_floor(p), device=device, reps=args.reps, warmup=args.warmup))
    table = [[name, "floor: 4 GEMMs over counted tokens", fmt_ms(floor_ms),
              "1.00×" if floor_ms else "n/a", "—", "—", "—", "—", reason or ""]]
    expected, reason = attempt(lambda: reference_outputs(p))
    if reason:
        print(f"  fp32 reference for the error columns: {reason}", file=sys.stderr, flush=True)
    for key in args.rows:
        label, build = ROWS[key]
        result, reason = attempt(lambda: measure(build, p, expected, device, args))
        if result is None:
            table.append([name, label, "—", "—", "—", "—", "—", "—", reason])
        else:
            ms, beyond, errors = result
            table.append([name, label, fmt_ms(ms), f"{ms / floor_ms:.2f}×" if floor_ms else "n/a", fmt_gb(beyond),
                          *errors, "" if key == "naive" else f"path {last_path()}"])
        print("  " + " | ".join(table[-1][1:]), file=sys.stderr, flush=True)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_choices_option(parser, "--shapes", SHAPES, "A")
    add_choices_option(parser, "--rows", ROWS)
    add_timing_options(parser, reps=REPS)
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    device = require_device(args)
    timing_defaults(args, reps=REPS)
    shapes = TINY_SHAPES if args.tiny else SHAPES

    rows = []
    for name in args.shapes:
        rows += bench_shape(name, shapes[name], args, device)
    report = "\n".join([
        *report_heading("prefops TDPO benchmark", args.tiny, device), "",
        f"TDPO2 (beta {BETA}, alpha {ALPHA}), KL(p_ref || p_θ) per token, mean over pairs; data as bench_core.py, "
        f"reference = policy + {REFERENCE_NOISE} x std noise on h and W; median of {args.reps} reps after "
        f"{args.warmup} warm-up. Memory = peak during fwd+bwd beyond the inputs and W.grad + h.grad. "
        "Errors against a chunked fp32-logit computation.", "",
        markdown_table(["shape", "row", "median ms", "× floor", "GB beyond grads", "loss rel err", "dh rel err",
                        "dW rel err", "note"], rows),
    ])
    finish_report(report, args.out)


if __name__ == "__main__":
    main()
