"""Judged samples -> training records: pairs for pairwise losses, ranked lists for listwise ones.

Modes, per prompt (completions the judge failed on, NaN, are dropped first):
  best_worst  the best against the worst completion
  all_pairs   every (i, j) with s_i > s_j
  margin      every (i, j) with s_i - s_j >= min_margin (and s_i > s_j)
  ranked      one list of the completions with their scores (needs >= 2 distinct scores)
  responses   one list of the completions with a per-response target each, ties kept, for the self-play
              losses (prefops.losses.self_play): `targets` win_rate, (1/K) sum_j P(i beats j), or
              preference_score, (1/K) sum_j logit P(i beats j), from the judge's preferences
              (prefops.losses.response_targets); a scalar judge's preferences are 1[s_i > s_j] + 1/2 1[s_i = s_j]
A pair of identical texts carries no preference and is dropped. With soft_labels a pair
gets preference_prob: the pairwise judge's P(i beats j) when `preferences` are given,
else sigmoid((s_i - s_j) / soft_label_scale).

With `spread`, the judge's uncertainty, a pair i > j has an evidence d >= 0 and its uncertainty u:
  scalar judge    spread [P, K], the sd of each score             d = s_i - s_j            u = sqrt(sd_i^2 + sd_j^2)
  pairwise judge  spread [P, K, K], the standard error of each    d = P(i beats j) - 1/2   u = se_ij
                  mean P(i beats j) (judge_repeats, an ensemble)
uncertainty_z drops a pair within noise, d <= z u (for a pairwise judge: its win probability
lies within z standard errors of 1/2; UPO's pairwise uncertainty, Wang et al. 2024). With
uncertainty_weighting each kept pair's loss is weighted by its certainty
    w = erf(d / (sqrt(2) u)) = 2 Phi(d / u) - 1        (1 where u = 0 < d, 0 where d = 0),
the probability that its orientation is right minus that it is wrong under a normal
posterior N(d, u^2): a coin-flip pair weighs 0, a sure one 1. UPO selects reliable pairs
by an MC-dropout estimator's pairwise uncertainty (repeated judgements here); weighting the
loss by certainty, and this weight, are our interpretation of its uncertainty-enhanced training.
"""
from __future__ import annotations

import math

import torch

from prefops.losses import response_targets

from .data import Record
from .judges import scalar_preferences

MODES = ("best_worst", "all_pairs", "margin", "ranked", "responses")


def _as_matrix(name: str, value, shape: tuple) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float64)
    if tuple(value.shape) != shape:
        axes = " x ".join(["prompts"] + ["completions"] * (len(shape) - 1))
        raise ValueError(f"{name} must have shape {list(shape)} ({axes}); got {list(value.shape)}")
    return value


def _candidates(mode: str, s: torch.Tensor, valid: list[int], min_margin: float) -> list[tuple[int, int]]:
    if mode == "best_worst":
        best = max(valid, key=lambda i: s[i])
        worst = min(valid, key=lambda i: s[i])
        return [(best, worst)] if s[best] > s[worst] else []
    threshold = min_margin if mode == "margin" else -math.inf
    return [(i, j) for i in valid for j in valid if s[i] > s[j] and s[i] - s[j] >= threshold]


def certainty(evidence: float, uncertainty: float) -> float:
    """A kept pair's weight under uncertainty_weighting (module docstring)."""
    return math.erf(evidence / (math.sqrt(2) * uncertainty)) if uncertainty > 0 else float(evidence > 0)


def build_records(prompts, completions, scores, *, mode: str = "best_worst", min_margin: float = 0.0,
                  soft_labels: bool = False, soft_label_scale: float = 1.0, preferences=None, spread=None,
                  uncertainty_z: float | None = 1.0, uncertainty_weighting: bool = False, where: str = "online",
                  completion_ids=None, targets: str | None = None) -> tuple[list[Record], dict]:
    """Records from judged completions ([P][K] texts, scores [P, K]) and statistics of what was kept:
    prompts, completions, dropped_nan (completions), candidate_pairs, dropped_identical, dropped_uncertain,
    dropped_nan_pairs (pairs whose pairwise judgement failed: their soft label or, with spread, their
    uncertainty), pairs, records, pair_yield (pairs per prompt). uncertainty_z None filters nothing (the
    spread may then only weight).
    In ranked mode candidate_pairs and pairs count the ordered pairs the lists hold; in responses mode
    `targets` (win_rate or preference_score) names the lists' per-response values, and pairs counts
    responses. completion_ids ([P][K] token id lists, as sampled) go into the records, which then train on
    those ids (data.Record)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not soft_label_scale > 0:
        raise ValueError(f"soft_label_scale must be > 0; got {soft_label_scale}")
    if mode in ("ranked", "responses") and (soft_labels or spread is not None):
        raise ValueError(f"soft_labels and the uncertainty filter (spread) act on pairs; mode {mode!r} keeps lists")
    if (mode == "responses") != (targets is not None):
        raise ValueError(f"targets (win_rate or preference_score) go with mode 'responses' only; got mode {mode!r} "
                         f"and targets {targets!r}")
    if uncertainty_weighting and spread is None:
        raise ValueError("uncertainty_weighting weights pairs by the judge's uncertainty: pass its spread")
    if len(completions) != len(prompts):
        raise ValueError(f"completions must hold one list per prompt; got {len(completions)} for {len(prompts)}")
    k = max((len(group) for group in completions), default=0)
    if any(len(group) != k for group in completions):
        raise ValueError("every prompt must have the same number of completions")
    scores = _as_matrix("scores", scores, (len(prompts), k))
    if preferences is not None:
        preferences = _as_matrix("preferences", preferences, (len(prompts), k, k))
    # A pairwise judge's uncertainty is that of its preferences, a scalar judge's that of its scores.
    per_pair = preferences is not None
    if spread is not None:
        spread = _as_matrix("spread", spread, (len(prompts), k, k) if per_pair else (len(prompts), k))
    if mode == "responses":
        if targets == "preference_score" and preferences is None:
            raise ValueError("targets preference_score are mean logits of P(i beats j): they need a pairwise "
                             "judge's preferences")
        judged = preferences if preferences is not None else scalar_preferences(scores)
        scores = response_targets(judged, targets)

    def evidence(p, i, j) -> tuple[float, float]:  # (d, u) of the pair i > j (module docstring)
        if per_pair:
            return preferences[p, i, j].item() - 0.5, spread[p, i, j].item()
        return (scores[p, i] - scores[p, j]).item(), math.hypot(spread[p, i], spread[p, j])

    def ids(p, chosen):  # the sampled token ids of completions `chosen` of prompt p, when given
        return None if completion_ids is None else [completion_ids[p][i] for i in chosen]

    stats = dict(prompts=len(prompts), completions=len(prompts) * k, dropped_nan=0, candidate_pairs=0,
                 dropped_identical=0, dropped_uncertain=0, dropped_nan_pairs=0, pairs=0, records=0)
    records = []
    for p, prompt in enumerate(prompts):
        s = scores[p]
        usable = s.isfinite() if spread is None or per_pair else s.isfinite() & spread[p].isfinite()
        valid = usable.nonzero().flatten().tolist()
        stats["dropped_nan"] += k - len(valid)
        if not valid:
            continue
        if mode == "responses":
            if len(valid) >= 2:  # a per-response target trains even where all tie
                records.append(Record(f"{where}#p{p}", prompt, [completions[p][i] for i in valid],
                                      completion_ids=ids(p, valid), scores=[s[i].item() for i in valid]))
                stats["candidate_pairs"] += len(valid)
                stats["pairs"] += len(valid)
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
            weight = None
            if spread is not None:
                d, u = evidence(p, i, j)
                if math.isnan(d) or math.isnan(u):
                    stats["dropped_nan_pairs"] += 1
                    continue
                if uncertainty_z is not None and d <= uncertainty_z * u:
                    stats["dropped_uncertain"] += 1
                    continue
                weight = certainty(d, u) if uncertainty_weighting else None
            probability = None
            if soft_labels:
                probability = (preferences[p, i, j] if preferences is not None
                               else torch.sigmoid((s[i] - s[j]) / soft_label_scale)).item()
                if math.isnan(probability):
                    stats["dropped_nan_pairs"] += 1
                    continue
            records.append(Record(f"{where}#p{p}[{i}>{j}]", prompt, [completions[p][i], completions[p][j]],
                                  completion_ids=ids(p, [i, j]),
                                  preference_prob=probability, weight=weight))
            stats["pairs"] += 1
    stats["records"] = len(records)
    stats["pair_yield"] = stats["pairs"] / max(len(prompts), 1)
    return records, stats
