"""ListwiseLoss: any listwise preference loss, fused from hidden states.

Each prompt has K >= 2 responses (K may differ between prompts). Sequences come as
a padded batch [S, T] or packed tokens with seq_ids in [0, S); `lists` [P, K] says
which sequences form each list (-1 marks an empty slot). By default the layout is
list-major: sequence p * K + k is response k of list p. Log-probs go through
prefops.sequence_objective (lean or budget strategy) with one loss group per list;
the reference comes precomputed per sequence or from reference hidden states +
weight on the forward-only fused path. The loss itself is
prefops.losses.listwise.listwise_loss's, exactly as on the reference path: its ListwiseSpec checks
the step's inputs once, before the fused pass, and the head evaluates the losses only.
"""
from __future__ import annotations

import torch

from .checks import ValueCheck, run_value_checks
from .losses.listwise import ListwiseSpec
from .objective import reference_logps, sequence_objective
from .preference import _sequence_totals
from .sequence_group import check_sequence_group, max_over_group, sequence_all_reduce
from .vocab_parallel import check_vocab_group


class ListwiseLoss(torch.nn.Module):
    """loss, metrics = ListwiseLoss("plackett_luce", beta=0.1)(hidden, weight, targets, scores=..., ref_logps=...)

    loss_type: a name in prefops.losses.listwise.LISTWISE_LOSSES. Other keyword
    parameters (top_k, target, pairwise_type, ...) go to listwise_loss.
    sequence_group: ranks that each hold a share of every sequence's tokens, as in
        prefops.PreferenceLoss (precomputed ref_logps are the whole sequences' sums).
    vocab_group: every weight passed is this rank's vocabulary rows, as in prefops.PreferenceLoss.
    """

    def __init__(self, loss_type="plackett_luce", beta=0.1, *, ignore_index=-100, temperature=1.0, softcap=None,
                 strategy=None, budget=None, sequence_group=None, vocab_group=None, **params):
        super().__init__()
        self.loss_type, self.beta, self.params = loss_type, beta, params
        self.options = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                            vocab_group=check_vocab_group(vocab_group))
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
        spec = ListwiseSpec(self.loss_type, self.beta, **self.params)
        lists, list_checks = self._lists(lists, labels_given.shape, num_sequences, targets.device)
        mask = lists >= 0
        # In range even before the checks have read lists, so that no gather reads out of bounds.
        slots = lists.clamp(0, num_sequences - 1)
        gather = lambda values: torch.where(mask, values[slots], 0.0)  # noqa: E731
        ref = self._reference(hidden, targets, seq_ids, num_sequences, gather, ref_logps, ref_hidden, ref_weight,
                              ref_bias)
        on_device = lambda values: None if values is None else values.to(targets.device)  # noqa: E731
        batch, checks = spec.prepare(mask, scores=on_device(scores), ranks=on_device(ranks), ref_logps=ref,
                                     lengths=gather(self._counts(targets, seq_ids, num_sequences)))
        # Every value check of the step, before the fused pass: the head that runs per chunk checks nothing.
        run_value_checks(list_checks + checks)
        num_lists = lists.shape[0]

        def head(logps, group_index, stats):
            return spec.losses(batch.part(group_index, logps)).sum() / num_lists

        out = sequence_objective(hidden, weight, targets, head=head, groups=lists, seq_ids=seq_ids, bias=bias,
                                 strategy=self.strategy, budget=self.budget, sequence_group=self.sequence_group,
                                 **self.options)
        metrics = spec.metrics(batch.part(None, gather(out.logps)))
        metrics["num_tokens/total"] = gather(out.stats["count"]).sum()
        return out.loss, metrics

    def _counts(self, targets, seq_ids, num_sequences):
        counted = (targets != self.options["ignore_index"]).float()
        return sequence_all_reduce(_sequence_totals(counted, seq_ids, num_sequences), self.sequence_group)

    @staticmethod
    def _lists(lists, shape, num_sequences, device):
        """(lists [P, K] on device, the checks of its values for run_value_checks)."""
        shape = tuple(shape)
        if lists is None:
            if len(shape) != 2 or shape[0] * shape[1] != num_sequences:
                raise ValueError(f"without lists, scores / ranks [P, K] must cover the {num_sequences} sequences "
                                 f"list-major (P * K = S); got shape {shape}: pass lists [P, K]")
            return torch.arange(num_sequences, device=device).view(shape), []
        if not isinstance(lists, torch.Tensor) or lists.dim() != 2 or lists.dtype.is_floating_point:
            raise ValueError("lists must be an integer tensor [P, K] of sequence indices (-1 for an empty slot)")
        if tuple(lists.shape) != shape:
            raise ValueError(f"scores / ranks must have the shape of lists {tuple(lists.shape)}; got {shape}")
        lists = lists.to(device).long()
        used = lists.reshape(-1).sort().values
        repeated = (used[1:] == used[:-1]) & (used[1:] >= 0)
        return lists, [ValueCheck(((lists < -1) | (lists >= num_sequences)).any(), lambda: _raise(
                           f"lists entries must be sequence indices in [0, {num_sequences}) or -1 (empty slot)")),
                       ValueCheck(repeated.any(), lambda: _raise(
                           "a sequence appears in more than one list slot; every slot needs its own sequence"))]

    def _reference(self, hidden, targets, seq_ids, num_sequences, gather, ref_logps, ref_hidden, ref_weight,
                   ref_bias):
        """The reference's sums [P, K] (gather: [S] -> [P, K]), or None."""
        sums = reference_logps(ref_hidden, ref_weight, targets, precomputed=ref_logps is not None and "ref_logps",
                               seq_ids=seq_ids, num_sequences=num_sequences, bias=ref_bias,
                               sequence_group=self.sequence_group, **self.options)
        if sums is not None:
            return gather(sums)
        if ref_logps is None:
            return None  # the spec says whether the loss type needs it
        if tuple(ref_logps.shape) != (num_sequences,):
            raise ValueError(f"ref_logps must have shape [S] = ({num_sequences},) (one per sequence); "
                             f"got {tuple(ref_logps.shape)}")
        return gather(ref_logps.to(hidden.device))


def _raise(message):
    raise ValueError(message)
