"""Curriculum pairs from ranked or scored lists (Curry-DPO), for a data pipeline.

Curry-DPO: Enhancing Alignment using Curriculum Learning & Ranked Preferences
(arXiv:2403.07230) turns each prompt's ranked responses into pairs and trains on
them from easy to hard: the larger the quality gap between chosen and rejected,
the easier the pair. With 4 ranked responses it pairs the best with each other
one, (1, 4) first, then (1, 3), then (1, 2).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .listwise import _check_finite, preference_matrix, ranks_to_labels

PAIRINGS = ("best_vs_rest", "all")


class CurriculumPair(NamedTuple):
    list_index: int
    chosen_index: int      # slot of the chosen response within its list
    rejected_index: int
    gap: float             # ψ_chosen - ψ_rejected > 0 (score gap; from ranks, the gap in responses ranked below)
    stage: int


def _as_padded(values, name):
    """A tensor [P, K] or ragged Python rows -> (float64 tensor [P, K], mask)."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 2:
            raise ValueError(f"{name} must be [P, K] or a sequence of per-list sequences; got {tuple(values.shape)}")
        return values.detach().cpu().double(), None
    if not isinstance(values, Sequence) or not all(isinstance(row, Sequence) for row in values):
        raise TypeError(f"{name} must be a tensor [P, K] or a sequence of per-list sequences")
    width = max((len(row) for row in values), default=0)
    padded = torch.zeros(len(values), width, dtype=torch.float64)
    mask = torch.zeros(len(values), width, dtype=torch.bool)
    for i, row in enumerate(values):
        padded[i, :len(row)] = torch.as_tensor(list(row), dtype=torch.float64)
        mask[i, :len(row)] = True
    return padded, mask


def curriculum_pairs(scores=None, ranks=None, *, mask=None, pairing="best_vs_rest", stages=1,
                     min_gap=None) -> list[CurriculumPair]:
    """Pairs (list, chosen, rejected, gap, stage) from lists, ordered easy -> hard.

    Args:
        scores (larger = better) or ranks (smaller = better, a tied ordering): exactly one,
            as a tensor [P, K] (with `mask`, True = present) or ragged per-list sequences.
        pairing: 'best_vs_rest' (each best response against every worse one, as Curry-DPO)
            or 'all' (every ordered pair).
        stages: an int n splits the easy -> hard order into n stages of near-equal size;
            'rank' gives one stage per rank distance between chosen and rejected, largest
            first (Curry-DPO's iterations: (1, 4), then (1, 3), then (1, 2)).
        min_gap: drop pairs whose gap is below this (explicitly; default keeps all).

    Every list needs at least 2 responses; tied responses never form a pair. Order:
    by stage, then larger gap first, then list, chosen and rejected index (deterministic).
    """
    if (scores is None) == (ranks is None):
        raise ValueError("pass exactly one of scores (larger = better) and ranks (smaller = better)")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {', '.join(map(repr, PAIRINGS))}; got {pairing!r}")
    if stages != "rank" and (isinstance(stages, bool) or not isinstance(stages, int) or stages < 1):
        raise ValueError(f"stages must be an int >= 1 or 'rank'; got {stages!r}")
    name = "scores" if scores is not None else "ranks"
    values, ragged_mask = _as_padded(scores if scores is not None else ranks, name)
    if mask is not None and ragged_mask is not None:
        raise ValueError("mask goes with a padded tensor; ragged lists need none")
    if mask is None:
        mask = ragged_mask if ragged_mask is not None else torch.ones(values.shape, dtype=torch.bool)
    elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != values.shape:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(values.shape)} (True = present)")
    mask = mask.cpu()
    sizes = mask.sum(1)
    if values.shape[1] < 2 or bool((sizes < 2).any()):
        p = int((sizes < 2).nonzero()[0]) if bool((sizes < 2).any()) else 0
        raise ValueError(f"list {p} has {int(sizes[p]) if sizes.numel() else 0} response(s); "
                         "every list needs at least 2")
    if scores is not None:
        _check_finite(values, mask, "scores")
        labels = torch.where(mask, values, 0.0)
    else:
        labels = ranks_to_labels(values, mask)
    better = preference_matrix(labels, mask)
    position = better.sum(1)  # responses strictly better than each one: its rank, ties shared
    if pairing == "best_vs_rest":
        best = labels == torch.where(mask, labels, -torch.inf).amax(1, keepdim=True)
        better = better & best[:, :, None]

    lists, chosen, rejected = (t.tolist() for t in better.nonzero(as_tuple=True))
    rows = []
    for p, i, j in zip(lists, chosen, rejected):
        gap = float(labels[p, i] - labels[p, j])
        if min_gap is not None and gap < min_gap:
            continue
        rows.append((p, i, j, gap, int(position[p, j] - position[p, i])))
    rows.sort(key=lambda row: (-row[3], row[0], row[1], row[2]))
    if stages == "rank":
        distances = sorted({row[4] for row in rows}, reverse=True)
        stage_of = {distance: index for index, distance in enumerate(distances)}
        staged = [CurriculumPair(*row[:4], stage_of[row[4]]) for row in rows]
        return sorted(staged, key=lambda pair: (pair.stage, -pair.gap, pair.list_index, pair.chosen_index,
                                                 pair.rejected_index))
    return [CurriculumPair(*row[:4], index * stages // len(rows)) for index, row in enumerate(rows)]
