"""Math on a tile of logits [rows, vocabulary block], shared by every path.

The Triton kernels compute the same quantities in registers; this PyTorch
version serves the CPU path, the budget strategy (which materialises whole
rows of logits) and documents the algebra in one place.

Per row, over a vocabulary range, we keep the online-softmax statistics
    m = max z,  s = sum exp(z - m),  a = sum exp(z - m) (z - m),
    q = sum exp(2 (z - m)),  t = z[target] (0 if the target is elsewhere),
    u = sum z  (a plain sum, never rescaled),
from which  lse = m + log s,  log p(target) = t - lse,
entropy = log s - a / s,  sum_v p_v^2 = q / s^2,  mean logit = u / V
and  top1 = (t >= m): the target is an argmax. A tie with another vocabulary entry
counts as top-1 (torch.argmax, and TRL, would pick the lower id); exact ties of
fp32 logits are rare enough that the metric does not notice.
Keeping `a` shifted by m avoids the cancellation of lse - E[z] at |z| ~ 1e3.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# Finite stand-in for -inf as the initial running max: exp(EMPTY - m) is 0 and
# (EMPTY - m) * 0 stays 0, where -inf would give NaN for empty ranges.
EMPTY = -1.0e38


class Stats(NamedTuple):
    max: torch.Tensor
    sumexp: torch.Tensor
    shifted: torch.Tensor
    sumexp2: torch.Tensor
    target: torch.Tensor
    logit_sum: torch.Tensor


class Token(NamedTuple):
    logp: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    sum_p2: torch.Tensor
    logit_sum: torch.Tensor
    """sum_v z_v; divided by V it is TRL's mean logit (the vocabulary size is the caller's)."""
    top1: torch.Tensor
    """bool: the target's logit is the row maximum (ties count)."""


def transform(linear: torch.Tensor, temperature: float, softcap: float | None) -> torch.Tensor:
    """z = softcap * tanh(u / softcap) with u = linear / temperature (fp32)."""
    u = _scaled(linear, temperature)
    return u if softcap is None else softcap * torch.tanh(u / softcap)


def transform_with_slope(linear: torch.Tensor, temperature: float, softcap: float | None):
    """(z, dz / dlinear): the logits of transform, bit for bit, and the chain-rule factor of their
    gradient (a tensor, or a number without softcap). 1 - tanh^2 is formed as 4e / (1 + e)^2 with
    e = exp(-2|u / softcap|), which keeps its relative accuracy where the tanh saturates (1 - t^2
    would cancel). Only the gradient paths pay for the slope."""
    u = _scaled(linear, temperature)
    if softcap is None:
        return u, 1.0 / temperature
    x = u / softcap
    e = torch.exp(-2.0 * x.abs())
    return softcap * torch.tanh(x), 4.0 * e / ((1.0 + e) * (1.0 + e) * temperature)


def _scaled(linear, temperature):
    u = linear.float()
    return u if temperature == 1.0 else u / temperature


def tile_stats(z: torch.Tensor, local_targets: torch.Tensor) -> Stats:
    """Statistics of fp32 logits z [n, v]; local_targets = target - first vocabulary index of the tile."""
    m = z.max(dim=1).values
    shifted = z - m[:, None]
    e = shifted.exp()
    inside = (local_targets >= 0) & (local_targets < z.shape[1])
    picked = z.gather(1, local_targets.clamp(0, z.shape[1] - 1).long()[:, None]).squeeze(1)
    return Stats(m, e.sum(1), (e * shifted).sum(1), (e * e).sum(1), torch.where(inside, picked, 0.0), z.sum(1))


def empty_stats(n: int, device) -> Stats:
    zeros = torch.zeros(n, device=device)
    return Stats(torch.full((n,), EMPTY, device=device), zeros, zeros, zeros, zeros, zeros)


def empty_top_k(n: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k (logits, ids) [n, k] before any vocabulary block: EMPTY and -1."""
    return (torch.full((n, k), EMPTY, device=device),
            torch.full((n, k), -1, device=device, dtype=torch.long))


def merge_top_k(top: tuple[torch.Tensor, torch.Tensor], z: torch.Tensor, v0: int):
    """Merge the top-k of a logits tile z [n, v] (first id v0) into the running (values, ids) [n, k]."""
    values, ids = top
    k = values.shape[1]
    tile_values, tile_ids = z.topk(min(k, z.shape[1]), dim=1)
    values, pick = torch.cat([values, tile_values], 1).topk(k, dim=1)
    return values, torch.cat([ids, tile_ids + v0], 1).gather(1, pick)


def combine(x: Stats, y: Stats) -> Stats:
    """Merge the statistics of two disjoint vocabulary ranges."""
    m = torch.maximum(x.max, y.max)
    cx, cy = (x.max - m).exp(), (y.max - m).exp()
    return Stats(
        m,
        x.sumexp * cx + y.sumexp * cy,
        cx * (x.shifted + (x.max - m) * x.sumexp) + cy * (y.shifted + (y.max - m) * y.sumexp),
        x.sumexp2 * cx * cx + y.sumexp2 * cy * cy,
        x.target + y.target,
        x.logit_sum + y.logit_sum,
    )


def combine_splits(partial: Stats) -> Stats:
    """Merge statistics stored along a last 'split' dimension [n, splits]."""
    m = partial.max.max(dim=1).values
    delta = partial.max - m[:, None]
    c = delta.exp()
    return Stats(
        m,
        (partial.sumexp * c).sum(1),
        (c * (partial.shifted + delta * partial.sumexp)).sum(1),
        (partial.sumexp2 * c * c).sum(1),
        partial.target.sum(1),
        partial.logit_sum.sum(1),
    )


def finalize(stats: Stats) -> Token:
    log_s = stats.sumexp.log()
    lse = stats.max + log_s
    return Token(stats.target - lse, lse, log_s - stats.shifted / stats.sumexp, stats.sumexp2 / stats.sumexp**2,
                 stats.logit_sum, stats.target >= stats.max)


def tile_grad(z, local_targets, lse, entropy, grad_logp, grad_lse, grad_entropy, slope):
    """d loss / d (h W^T + b) for a tile, given upstream grads of logp, lse and entropy per row.

    dz_v = g_logp [v = target] + p_v (g_lse - g_logp - g_ent (log p_v + H)), then times the
    slope dz / d(h W^T + b) of transform_with_slope (softcap and temperature chain rule).
    """
    log_p = z - lse[:, None]
    p = log_p.exp()
    coef = (grad_lse - grad_logp)[:, None]
    if grad_entropy is not None:
        coef = coef - grad_entropy[:, None] * (log_p + entropy[:, None])
    dz = p * coef
    inside = (local_targets >= 0) & (local_targets < z.shape[1])
    rows = inside.nonzero().squeeze(1)
    dz.index_put_((rows, local_targets[rows].long()), grad_logp[rows], accumulate=True)
    return dz * slope
