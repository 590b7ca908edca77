"""ListwiseLoss: any listwise preference loss, fused from hidden states.

Each prompt has K >= 2 responses (K may differ between prompts). Sequences come as
a padded batch [S, T] or packed tokens with seq_ids in [0, S); `lists` [P, K] says
which sequences form each list (-1 marks an empty slot). By default the layout is
list-major: sequence p * K + k is response k of list p. Log-probs go through
prefops.sequence_objective (lean or budget strategy) with one loss group per list;
the reference comes precomputed per sequence or from reference hidden states +
weight on the forward-only fused path. The loss itself is
prefops.losses.listwise.listwise_loss, exactly as on the reference path.
"""
from __future__ import annotations

import torch

from .losses.listwise import PAIR_BASED, listwise_loss, preference_matrix
from .objective import sequence_objective
from .sequence_group import check_sequence_group, max_over_group, sequence_all_reduce
from .sequences import sequence_count

# Pairwise types whose loss has an NLL term averaged over the batch's chosen tokens.
_NLL_TYPES = ("sft", "cpo", "orpo")


def _sum_of_logps(logps, group_index, stats):
    return logps.sum()


class ListwiseLoss(torch.nn.Module):
    """loss, metrics = ListwiseLoss("plackett_luce", beta=0.1)(hidden, weight, targets, scores=..., ref_logps=...)

    loss_type: a name in prefops.losses.listwise.LISTWISE_LOSSES. Other keyword
    parameters (top_k, target, pairwise_type, ...) go to listwise_loss.
    sequence_group: ranks that each hold a share of every sequence's tokens, as in
        prefops.PreferenceLoss (precomputed ref_logps are the whole sequences' sums).
    """

    def __init__(self, loss_type="plackett_luce", beta=0.1, *, ignore_index=-100, temperature=1.0, softcap=None,
                 strategy=None, budget=None, sequence_group=None, **params):
        super().__init__()
        self.loss_type, self.beta, self.params = loss_type, beta, params
        self.options = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap)
        self.strategy, self.budget = strategy, budget
        self.sequence_group = check_sequence_group(sequence_group)

    def forward(self, hidden, weight, targets, *, lists=None, scores=None, ranks=None, seq_ids=None, bias=None,
                ref_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None):
        """Returns (mean loss over lists, metrics; see prefops.losses.listwise).

        scores / ranks: [P, K] aligned with `lists` (exactly one of them).
        ref_logps: [S] reference log-prob sum of every sequence, or pass ref_hidden and ref_weight.
        """
        if seq_ids is None and targets.dim() != 2:
            raise ValueError("targets must be a padded batch [S, T], or pass seq_ids for packed tokens")
        num_sequences = targets.shape[0] if seq_ids is None else max_over_group(
            int(seq_ids.max()) + 1, self.sequence_group, targets.device)
        labels_given = scores if scores is not None else ranks
        if labels_given is None or (scores is not None and ranks is not None):
            raise ValueError("pass exactly one of scores (larger = better) and ranks (smaller = better), [P, K]")
        if not isinstance(labels_given, torch.Tensor):
            raise TypeError("scores / ranks must be a tensor [P, K] aligned with lists (-1 slots are ignored)")
        lists = self._lists(lists, labels_given.shape, num_sequences, targets.device)
        mask = lists >= 0
        num_lists = lists.shape[0]
        ref = self._reference(hidden, targets, seq_ids, lists, num_sequences, ref_logps, ref_hidden, ref_weight,
                              ref_bias)
        params = dict(self.params)
        if self._has_nll(params) and "nll_mean_length" not in params:
            counts = self._counts(targets, seq_ids, num_sequences)
            labels = scores if scores is not None else -ranks
            params["nll_mean_length"] = self._mean_chosen_length(labels, mask, counts[lists.clamp_min(0)])

        def sequence_loss(logps, group_index, lengths):
            pick = lambda values: None if values is None else values[group_index]  # noqa: E731
            return listwise_loss(logps, pick(ref), scores=pick(scores), ranks=pick(ranks), mask=mask[group_index],
                                 lengths=lengths, loss_type=self.loss_type, beta=self.beta, **params)

        def head(logps, group_index, stats):
            losses, _ = sequence_loss(logps, group_index, stats["count"])
            return losses.sum() / num_lists

        out = sequence_objective(hidden, weight, targets, head=head, groups=lists, seq_ids=seq_ids, bias=bias,
                                 strategy=self.strategy, budget=self.budget, sequence_group=self.sequence_group,
                                 **self.options)
        gather = lambda values: torch.where(mask, values[lists.clamp_min(0)], 0.0)  # noqa: E731
        everything = torch.arange(num_lists, device=lists.device)
        _, metrics = sequence_loss(gather(out.logps), everything, gather(out.stats["count"]))
        metrics["num_tokens/total"] = gather(out.stats["count"]).sum()
        return out.loss, metrics

    def _has_nll(self, params):
        if self.loss_type not in PAIR_BASED:
            return False
        types = params.get("pairwise_type", "sigmoid")
        return bool(set([types] if isinstance(types, str) else types) & set(_NLL_TYPES))

    @staticmethod
    def _mean_chosen_length(labels, mask, lengths):
        """Mean chosen length over every ordered pair of the batch, so the pairwise NLL term stays
        additive over lists (the budget strategy evaluates the loss a chunk of lists at a time)."""
        labels = labels.to(device=mask.device, dtype=torch.float64)
        better = preference_matrix(torch.where(mask, labels, 0.0), mask)
        return float((better.sum(-1) * lengths).sum() / better.sum().clamp_min(1))

    def _counts(self, targets, seq_ids, num_sequences):
        counted = targets != self.options["ignore_index"]
        if seq_ids is None:
            counts = sequence_count(counted.float(), counted)
        else:
            keep = seq_ids.reshape(-1) >= 0
            counts = sequence_count(counted.reshape(-1)[keep].float(), counted.reshape(-1)[keep],
                                    seq_ids=seq_ids.reshape(-1)[keep], num_sequences=num_sequences)
        return sequence_all_reduce(counts, self.sequence_group)

    @staticmethod
    def _lists(lists, shape, num_sequences, device):
        shape = tuple(shape)
        if lists is None:
            if len(shape) != 2 or shape[0] * shape[1] != num_sequences:
                raise ValueError(f"without lists, scores / ranks [P, K] must cover the {num_sequences} sequences "
                                 f"list-major (P * K = S); got shape {shape}: pass lists [P, K]")
            return torch.arange(num_sequences, device=device).view(shape)
        if not isinstance(lists, torch.Tensor) or lists.dim() != 2 or lists.dtype.is_floating_point:
            raise ValueError("lists must be an integer tensor [P, K] of sequence indices (-1 for an empty slot)")
        if tuple(lists.shape) != shape:
            raise ValueError(f"scores / ranks must have the shape of lists {tuple(lists.shape)}; got {shape}")
        lists = lists.to(device).long()
        if bool(((lists < -1) | (lists >= num_sequences)).any()):
            raise ValueError(f"lists entries must be sequence indices in [0, {num_sequences}) or -1 (empty slot)")
        used = lists[lists >= 0]
        if used.unique().numel() != used.numel():
            raise ValueError("a sequence appears in more than one list slot; every slot needs its own sequence")
        return lists

    @torch.no_grad()
    def _reference(self, hidden, targets, seq_ids, lists, num_sequences, ref_logps, ref_hidden, ref_weight,
                   ref_bias):
        if ref_hidden is not None:
            if ref_logps is not None:
                raise ValueError("pass either ref_hidden/ref_weight or ref_logps, not both")
            if ref_weight is None:
                raise ValueError("ref_hidden needs ref_weight")
            # Without grad the sliced path saves nothing for backward: the forward-only fused op.
            out = sequence_objective(ref_hidden, ref_weight, targets, head=_sum_of_logps, groups=lists,
                                     seq_ids=seq_ids, bias=ref_bias, strategy="sliced",
                                     sequence_group=self.sequence_group, **self.options)
            return torch.where(lists >= 0, out.logps[lists.clamp_min(0)], 0.0)
        if ref_logps is None:
            return None  # listwise_loss says whether the loss type needs it
        if tuple(ref_logps.shape) != (num_sequences,):
            raise ValueError(f"ref_logps must have shape [S] = ({num_sequences},) (one per sequence); "
                             f"got {tuple(ref_logps.shape)}")
        return torch.where(lists >= 0, ref_logps.to(hidden.device)[lists.clamp_min(0)], 0.0)
