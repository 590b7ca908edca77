"""Judged samples -> training records: pairs for pairwise losses, ranked lists for listwise ones.

Modes, per prompt (completions the judge failed on, NaN, are dropped first):
  best_worst  the best against the worst completion
  all_pairs   every (i, j) with s_i > s_j
  margin      every (i, j) with s_i - s_j >= min_margin (and s_i > s_j)
  ranked      one list of the completions with their scores (needs >= 2 distinct scores)
A pair of identical texts carries no preference and is dropped. With soft_labels a pair
gets preference_prob: the pairwise judge's P(i beats j) when `preferences` are given,
else sigmoid((s_i - s_j) / soft_label_scale). With `spread` (the scores' uncertainty,
[P, K]) a pair is dropped when its gap is within noise: s_i - s_j <= z sqrt(sd_i^2 + sd_j^2).
"""
from __future__ import annotations

import math

import torch

from .data import Record

MODES = ("best_worst", "all_pairs", "margin", "ranked")


def _as_matrix(name: str, value, shape: tuple) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float64)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} (prompts x completions); got {list(value.shape)}")
    return value


def _candidates(mode: str, s: torch.Tensor, valid: list[int], min_margin: float) -> list[tuple[int, int]]:
    if mode == "best_worst":
        best = max(valid, key=lambda i: s[i])
        worst = min(valid, key=lambda i: s[i])
        return [(best, worst)] if s[best] > s[worst] else []
    threshold = min_margin if mode == "margin" else -math.inf
    return [(i, j) for i in valid for j in valid if s[i] > s[j] and s[i] - s[j] >= threshold]


def build_records(prompts, completions, scores, *, mode: str = "best_worst", min_margin: float = 0.0,
                  soft_labels: bool = False, soft_label_scale: float = 1.0, preferences=None, spread=None,
                  uncertainty_z: float = 1.0, where: str = "online", completion_ids=None
                  ) -> tuple[list[Record], dict]:
    """Records from judged completions ([P][K] texts, scores [P, K]) and statistics of what was kept:
    prompts, completions, dropped_nan (completions), candidate_pairs, dropped_identical, dropped_uncertain,
    dropped_nan_pairs (soft labels the pairwise judge failed on), pairs, records, pair_yield (pairs per prompt).
    In ranked mode candidate_pairs and pairs count the ordered pairs the lists hold. completion_ids ([P][K]
    token id lists, as sampled) go into the records, which then train on those ids (data.Record)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not soft_label_scale > 0:
        raise ValueError(f"soft_label_scale must be > 0; got {soft_label_scale}")
    if mode == "ranked" and (soft_labels or spread is not None):
        raise ValueError("soft_labels and the uncertainty filter (spread) act on pairs; mode 'ranked' keeps lists")
    if len(completions) != len(prompts):
        raise ValueError(f"completions must hold one list per prompt; got {len(completions)} for {len(prompts)}")
    k = max((len(group) for group in completions), default=0)
    if any(len(group) != k for group in completions):
        raise ValueError("every prompt must have the same number of completions")
    scores = _as_matrix("scores", scores, (len(prompts), k))
    spread = None if spread is None else _as_matrix("spread", spread, (len(prompts), k))
    if preferences is not None:
        preferences = torch.as_tensor(preferences, dtype=torch.float64)
        if tuple(preferences.shape) != (len(prompts), k, k):
            raise ValueError(f"preferences must have shape [{len(prompts)}, {k}, {k}]; got {list(preferences.shape)}")

    def ids(p, chosen):  # the sampled token ids of completions `chosen` of prompt p, when given
        return None if completion_ids is None else [completion_ids[p][i] for i in chosen]

    stats = dict(prompts=len(prompts), completions=len(prompts) * k, dropped_nan=0, candidate_pairs=0,
                 dropped_identical=0, dropped_uncertain=0, dropped_nan_pairs=0, pairs=0, records=0)
    records = []
    for p, prompt in enumerate(prompts):
        s = scores[p]
        usable = s.isfinite() if spread is None else s.isfinite() & spread[p].isfinite()
        valid = usable.nonzero().flatten().tolist()
        stats["dropped_nan"] += k - len(valid)
        if not valid:
            continue
        if mode == "ranked":
            if len({s[i].item() for i in valid}) >= 2:
                records.append(Record(f"{where}#p{p}", prompt, [completions[p][i] for i in valid],
                                      completion_ids=ids(p, valid),
                                      scores=[s[i].item() for i in valid]))
                ordered = sum(bool(s[i] > s[j]) for i in valid for j in valid)
                stats["candidate_pairs"] += ordered
                stats["pairs"] += ordered
            continue
        for i, j in _candidates(mode, s, valid, min_margin):
            if preferences is not None and preferences[p, i, j] < 0.5:
                # A pairwise judge's scores are mean win probabilities, which need not order every pair as
                # its direct comparison does: the comparison decides which is chosen.
                i, j = j, i
            stats["candidate_pairs"] += 1
            if completions[p][i] == completions[p][j]:
                stats["dropped_identical"] += 1
                continue
            if spread is not None and s[i] - s[j] <= uncertainty_z * (spread[p, i] ** 2 + spread[p, j] ** 2).sqrt():
                stats["dropped_uncertain"] += 1
                continue
            probability = None
            if soft_labels:
                probability = (preferences[p, i, j] if preferences is not None
                               else torch.sigmoid((s[i] - s[j]) / soft_label_scale)).item()
                if math.isnan(probability):
                    stats["dropped_nan_pairs"] += 1
                    continue
            records.append(Record(f"{where}#p{p}[{i}>{j}]", prompt, [completions[p][i], completions[p][j]],
                                  completion_ids=ids(p, [i, j]),
                                  preference_prob=probability))
            stats["pairs"] += 1
    stats["records"] = len(records)
    stats["pair_yield"] = stats["pairs"] / max(len(prompts), 1)
    return records, stats
