"""PreferenceLoss: any pairwise loss of the DPO family, fused from hidden states.

Chosen and rejected sequences come stacked [chosen; rejected] in a padded batch
[2P, T] (pair i is rows i and P + i), or packed as flat tokens with seq_ids in
[0, 2P) under the same numbering. Log-probs go through prefops.sequence_objective
(lean or budget strategy), the reference either as precomputed per-sequence
log-probs or as reference hidden states + weight on the forward-only fused path.
The loss itself is prefops.losses.pairwise_loss, exactly as on the reference path.
"""
from __future__ import annotations

import torch

from .losses import REFERENCE_FREE, ld_dpo_token_weights, pairwise_loss
from .objective import sequence_objective
from .ops import linear_logprobs
from .sequences import sequence_sum


class PreferenceLoss(torch.nn.Module):
    """loss, metrics = PreferenceLoss("sigmoid", beta=0.1)(hidden, weight, targets, ref_chosen_logps=..., ...)

    loss_type: a name or list of names (with loss_weights) as in TRL's DPOConfig.
    ld_alpha: LD-DPO weight of the tokens beyond the shorter response (padded layout).
    wpo: weight each pair by WPO's on-policy weight (sum_v p_v^2 comes from the fused pass).
    Other keyword parameters go to prefops.losses.pairwise_loss.
    """

    def __init__(self, loss_type="sigmoid", beta=0.1, *, label_smoothing=0.0, loss_weights=None, ld_alpha=None,
                 wpo=False, ignore_index=-100, temperature=1.0, softcap=None, strategy=None, budget=None, **params):
        super().__init__()
        self.loss_type, self.beta, self.label_smoothing = loss_type, beta, label_smoothing
        self.loss_weights, self.ld_alpha, self.wpo, self.params = loss_weights, ld_alpha, wpo, params
        self.options = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap)
        self.strategy, self.budget = strategy, budget
        names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        self.needs_reference = any(name not in REFERENCE_FREE for name in names)

    def _sequence_loss(self, chosen, rejected, ref_chosen, ref_rejected, lengths, pair_weights, mean_length):
        params = dict(self.params, nll_mean_length=mean_length)
        if pair_weights is not None:
            params["pair_weights"] = pair_weights
        return pairwise_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type=self.loss_type, beta=self.beta,
                             label_smoothing=self.label_smoothing, chosen_lengths=lengths[:, 0],
                             rejected_lengths=lengths[:, 1], loss_weights=self.loss_weights, **params)

    def forward(self, hidden, weight, targets, *, bias=None, seq_ids=None, ref_chosen_logps=None,
                ref_rejected_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None):
        """Returns (mean loss over pairs, metrics with TRL's names)."""
        if seq_ids is None and targets.dim() != 2:
            raise ValueError("targets must be a padded batch [2P, T] of [chosen; rejected], or pass seq_ids")
        num_sequences = targets.shape[0] if seq_ids is None else int(seq_ids.max()) + 1
        if num_sequences % 2:
            raise ValueError(f"expected an even number of sequences [chosen; rejected]; got {num_sequences}")
        pairs = num_sequences // 2
        groups = torch.stack([torch.arange(pairs), torch.arange(pairs) + pairs], 1).to(targets.device)
        token_weights = self._token_weights(targets, seq_ids)
        ref = self._reference(targets, seq_ids, token_weights, ref_chosen_logps, ref_rejected_logps,
                              ref_hidden, ref_weight, ref_bias, pairs)

        counted = targets != self.options["ignore_index"]
        chosen_tokens = counted[:pairs].sum() if seq_ids is None else (counted.reshape(-1) & (
            seq_ids.reshape(-1) < pairs) & (seq_ids.reshape(-1) >= 0)).sum()
        mean_length = chosen_tokens.float() / pairs

        def head(logps, group_index, stats):
            pick = lambda values: None if values is None else values[group_index]  # noqa: E731
            losses, _ = self._sequence_loss(logps[:, 0], logps[:, 1], pick(ref[0]), pick(ref[1]), stats["count"],
                                            self._wpo_weights(logps, stats), mean_length)
            return losses.sum() / pairs

        stats = ("log_sum_p2",) if self.wpo else ()
        out = sequence_objective(hidden, weight, targets, head=head, groups=groups, seq_ids=seq_ids,
                                 token_weights=token_weights, bias=bias, stats=stats, strategy=self.strategy,
                                 budget=self.budget, **self.options)
        logps = out.logps[groups]
        seq_stats = {k: v[groups] for k, v in out.stats.items()}
        _, metrics = self._sequence_loss(logps[:, 0], logps[:, 1], ref[0], ref[1], seq_stats["count"],
                                         self._wpo_weights(logps, seq_stats), mean_length)
        metrics["num_tokens/chosen"] = seq_stats["count"][:, 0].sum()
        metrics["num_tokens/rejected"] = seq_stats["count"][:, 1].sum()
        return out.loss, metrics

    def _wpo_weights(self, logps, stats):
        if not self.wpo:
            return None
        per_sequence = ((logps.detach() - stats["log_sum_p2"]) / stats["count"]).exp()
        return per_sequence[:, 0] * per_sequence[:, 1]

    def _token_weights(self, targets, seq_ids):
        if self.ld_alpha is None:
            return None
        if seq_ids is not None:
            raise ValueError("ld_alpha needs the padded [chosen; rejected] layout (seq_ids given)")
        counted = targets != self.options["ignore_index"]
        pairs = targets.shape[0] // 2
        chosen, rejected = ld_dpo_token_weights(counted[:pairs], counted[pairs:], self.ld_alpha)
        return torch.cat([chosen, rejected])

    @torch.no_grad()
    def _reference(self, targets, seq_ids, token_weights, ref_chosen, ref_rejected, ref_hidden, ref_weight,
                   ref_bias, pairs):
        if ref_hidden is not None:
            if ref_chosen is not None or ref_rejected is not None:
                raise ValueError("pass either ref_hidden/ref_weight or ref_chosen_logps/ref_rejected_logps, not both")
            if ref_weight is None:
                raise ValueError("ref_hidden needs ref_weight")
            token = linear_logprobs(ref_hidden, ref_weight, targets, bias=ref_bias, **self.options)
            counted = (targets != self.options["ignore_index"]).float()
            weights = counted if token_weights is None else token_weights
            if seq_ids is None:
                sums = sequence_sum(token, weights)
            else:
                sums = sequence_sum(token.reshape(-1), weights.reshape(-1), seq_ids=seq_ids.reshape(-1),
                                    num_sequences=2 * pairs)
            return sums[:pairs], sums[pairs:]
        if self.needs_reference and (ref_chosen is None or ref_rejected is None):
            raise ValueError(f"loss_type {self.loss_type!r} needs the reference: pass ref_chosen_logps and "
                             "ref_rejected_logps, or ref_hidden and ref_weight")
        for name, value in (("ref_chosen_logps", ref_chosen), ("ref_rejected_logps", ref_rejected)):
            if value is not None and tuple(value.shape) != (pairs,):
                raise ValueError(f"{name} must have shape [P] = ({pairs},); got {tuple(value.shape)}")
        return ref_chosen, ref_rejected
