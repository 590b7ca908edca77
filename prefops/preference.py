"""PreferenceLoss: any pairwise loss of the DPO family, fused from hidden states.

Chosen and rejected sequences come stacked [chosen; rejected] in a padded batch
[2P, T] (pair i is rows i and P + i), or packed as flat tokens with seq_ids in
[0, 2P) under the same numbering. Log-probs go through prefops.sequence_objective
(lean or budget strategy), the reference either as precomputed per-sequence
log-probs or as reference hidden states + weight on the forward-only fused path.
The loss itself is prefops.losses.pairwise_loss, exactly as on the reference path.
"""
from __future__ import annotations

import warnings

import torch

from .checks import check_targets_in_range, run_value_checks
from .losses import PARAM_DEFAULTS, REFERENCE_FREE, ld_dpo_token_weights, wpo_weights
from .losses.pairwise import (BATCH_VALUES, PAIR_TENSORS, TOKEN_LEVEL_LOSSES, PairwiseSpec, has_nll_term,
                              lengths_check, split_params)
from .config import get_settings
from .losses.token_level import tgdpo_token_rewards
from .objective import reference_logps, sequence_objective
from .per_sequence import _per_sequence
from .sequence_group import check_sequence_group, max_over_group, sequence_all_reduce
from .vocab_parallel import check_vocab_group, vocab_size
from .ops import linear_logprobs
from .token_kl import sequence_kl_objective

# Loss types whose loss of a pair depends on the other pairs of the batch.
BATCH_COUPLED_LOSSES = ("aot", "aot_unpaired")
# Per-sequence statistics behind TRL's token metrics (entropy, logits/*, mean_token_accuracy).
TOKEN_METRIC_STATS = ("entropy", "mean_logit", "top1")


class PreferenceLoss(torch.nn.Module):
    """loss, metrics = PreferenceLoss("sigmoid", beta=0.1)(hidden, weight, targets, ref_chosen_logps=..., ...)

    loss_type: a name or list of names (with loss_weights) as in TRL's DPOConfig.
    ld_alpha: LD-DPO weight of the tokens beyond the shorter response (padded layout).
    wpo: weight each pair by WPO's on-policy weight (sum_v p_v^2 comes from the fused pass).
    tgdpo_alpha: TGDPO's α: weight chosen tokens by 1 + αβ r̂_t and rejected ones by 1 - αβ r̂_t,
        r̂_t = log π_rm(y_t) - log π_ref(y_t) (pass rm_hidden/rm_weight or token_rewards to forward).
    kl_direction: the per-token KL of the TDPO losses ('tdpo1', 'tdpo2'): 'ref_policy' (TDPO's
        KL(π_ref || π_θ)) or 'policy_ref'. Those losses need ref_hidden and ref_weight: the KL, the
        policy and the reference log-probs come from one fused pass (prefops.linear_token_kl).
    token_metrics: also return TRL's per-token metrics of the policy, from the same fused pass:
        'entropy' (mean next-token entropy over chosen and rejected completion tokens),
        'logits/chosen' and 'logits/rejected' (mean over those tokens of sum_v z_v / V) and
        'mean_token_accuracy' (fraction of chosen completion tokens whose target is an argmax
        of z; a tie counts as a hit, where TRL gives it to the lowest id). Each is a sum over
        this batch's tokens divided by their count (0 with no token), as TRL logs it per step.
        Off by default only to keep the metrics of existing callers unchanged; the cost is a few
        per-sequence sums. Not available for the token-level (TDPO) losses.
    sequence_group: a torch.distributed ProcessGroup whose ranks each hold a share of every
        sequence's tokens (context parallelism; see prefops.sequence_objective): every rank passes
        the same sequences and numbering with its own tokens and gets the loss and metrics of the
        whole sequences; sum the weight gradients over the group. Precomputed ref_*_logps are
        the whole sequences' sums; ld_alpha needs whole sequences (pass the LD-DPO weights of
        prefops.losses.ld_dpo_token_weights, sharded like targets, as token_weights).
    vocab_group: a torch.distributed ProcessGroup over which every weight passed (policy, reference,
        reward model; and their biases) is sharded along the vocabulary (prefops.vocab_parallel): each
        rank passes its rows and the same hidden states and targets, and gets the whole vocabulary's loss
        and metrics, the full gradient of hidden and its own rows' weight gradient. Shard(0) DTensor
        weights need no vocab_group.
    Other keyword parameters go to prefops.losses.pairwise_loss.
    """

    def __init__(self, loss_type="sigmoid", beta=0.1, *, label_smoothing=0.0, loss_weights=None, ld_alpha=None,
                 wpo=False, tgdpo_alpha=None, kl_direction="ref_policy", token_metrics=False, ignore_index=-100,
                 temperature=1.0, softcap=None, strategy=None, budget=None, sequence_group=None, vocab_group=None,
                 **params):
        super().__init__()
        self.loss_type, self.beta, self.label_smoothing = loss_type, beta, label_smoothing
        self.loss_weights, self.ld_alpha, self.wpo, self.params = loss_weights, ld_alpha, wpo, params
        self.tgdpo_alpha, self.kl_direction, self.token_metrics = tgdpo_alpha, kl_direction, token_metrics
        self.options = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                            vocab_group=check_vocab_group(vocab_group))
        self.strategy, self.budget = strategy, budget
        self.sequence_group = check_sequence_group(sequence_group)
        if sequence_group is not None and ld_alpha is not None:
            raise ValueError("ld_alpha needs each response's token positions, which a sequence shard does not have: "
                             "with sequence_group, pass prefops.losses.ld_dpo_token_weights of the whole sequences, "
                             "sharded like targets, as token_weights")
        names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        self.needs_reference = any(name not in REFERENCE_FREE for name in names)
        self.token_level = any(name in TOKEN_LEVEL_LOSSES for name in names)
        self.batch_coupled = any(name in BATCH_COUPLED_LOSSES for name in names)
        if {"chosen_nll_logps", "chosen_nll_lengths"} & set(params):
            raise ValueError("chosen_nll_logps / chosen_nll_lengths come from the fused pass: pass nll_targets to "
                             "forward instead")
        if self.token_level and wpo:
            raise ValueError("wpo cannot be combined with the TDPO losses")
        if self.token_level and token_metrics:
            raise ValueError("token_metrics is not available for the TDPO losses (their fused pass is the KL's)")

    def forward(self, hidden, weight, targets, *, bias=None, seq_ids=None, ref_chosen_logps=None,
                ref_rejected_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None, token_weights=None,
                token_rewards=None, rm_hidden=None, rm_weight=None, rm_bias=None, nll_targets=None):
        """Returns (mean loss over pairs, metrics with TRL's names).

        ref_chosen_logps / ref_rejected_logps (or ref_hidden): not needed when every loss type is
        in prefops.losses.REFERENCE_FREE.
        token_weights: [...] like targets, multiplies each token's log-prob (policy and, when
        computed here from ref_hidden, reference) in the sequence sums; precomputed
        ref_*_logps must carry the same weights. token_rewards ([...], r̂_t) or rm_hidden,
        rm_weight, rm_bias (a third model, run forward-only) give TGDPO's token weights.
        nll_targets: [...] like targets: the NLL term (sft, cpo, orpo) as the unweighted token-mean
        NLL of these targets over the chosen sequences (only their entries are read) instead of
        the preference targets; TRL's ORPO takes the input ids of prompt and completion (Liger's
        nll_target). Their log-probs come from the same fused pass, which then also runs the
        chosen sequences' counted nll_targets tokens."""
        if seq_ids is None and targets.dim() != 2:
            raise ValueError("targets must be a padded batch [2P, T] of [chosen; rejected], or pass seq_ids")
        num_sequences = targets.shape[0] if seq_ids is None else max_over_group(
            int(seq_ids.max()) + 1, self.sequence_group, targets.device)
        if num_sequences % 2:
            raise ValueError(f"expected an even number of sequences [chosen; rejected]; got {num_sequences}")
        pairs = num_sequences // 2
        groups = torch.arange(num_sequences, device=targets.device).view(2, pairs).t()
        options, given = split_params(self.params)
        spec = PairwiseSpec(self.loss_type, self.beta, self.label_smoothing, self.loss_weights, **options)
        token_weights = self._token_weights(targets, seq_ids, token_weights)
        token_weights = self._tgdpo_weights(targets, seq_ids, pairs, token_weights, token_rewards, ref_hidden,
                                            ref_weight, ref_bias, rm_hidden, rm_weight, rm_bias)
        nll_rows = self._nll_rows(targets, seq_ids, pairs, nll_targets,
                                  vocab_size(weight, self.options["vocab_group"]))
        lengths, nll_lengths = self._lengths(targets, seq_ids, pairs, nll_targets)
        # A caller's nll_mean_length (a whole step's, across micro-batches and ranks) wins over this batch's.
        batch_values = {name: given[name] for name in BATCH_VALUES if name in given}
        if "nll_mean_length" not in batch_values and has_nll_term(spec.loss_types, spec.options):
            batch_values["nll_mean_length"] = (lengths[:, 0] if nll_lengths is None else nll_lengths).sum() / pairs
        per_pair = {name: given[name] for name in PAIR_TENSORS if given.get(name) is not None}
        if not self.token_level:  # the TDPO losses' reference comes out of their fused pass
            ref_chosen, ref_rejected = self._reference(targets, seq_ids, token_weights, ref_chosen_logps,
                                                       ref_rejected_logps, ref_hidden, ref_weight, ref_bias, pairs)
            per_pair.update({name: value for name, value in (("ref_chosen_logps", ref_chosen),
                                                             ("ref_rejected_logps", ref_rejected))
                             if value is not None})
        # Every value check of the step, before the fused pass: the head that runs per chunk checks nothing.
        run_value_checks([*spec.check({**per_pair, "chosen_lengths": lengths[:, 0],
                                       "rejected_lengths": lengths[:, 1]}),
                          lengths_check(nll_lengths, "chosen_nll_lengths")])
        if self.token_level:
            return self._token_level_forward(spec, per_pair, batch_values, hidden, weight, targets, bias, seq_ids,
                                             pairs, groups, token_weights, ref_chosen_logps, ref_rejected_logps,
                                             ref_hidden, ref_weight, ref_bias)
        if nll_rows is not None:
            hidden, targets, seq_ids, token_weights, groups = _append_nll_sequences(
                hidden, targets, seq_ids, token_weights, groups, nll_targets, nll_rows)

        def head(logps, group_index, stats):
            values = _pair_values(per_pair, logps, stats["count"], group_index, **batch_values)
            if self.wpo:
                values["pair_weights"] = self._wpo_weights(stats)
            return spec.losses(spec.batch(values)).sum() / pairs

        stats = (("log_sum_p2", "logp") if self.wpo else ()) + (TOKEN_METRIC_STATS if self.token_metrics else ())
        out = sequence_objective(hidden, weight, targets, head=head, groups=groups, seq_ids=seq_ids,
                                 token_weights=token_weights, bias=bias, stats=stats, strategy=self._strategy(),
                                 budget=self.budget, sequence_group=self.sequence_group, **self.options)
        count = out.stats["count"][groups]
        metrics = spec.metrics(spec.batch(_pair_values(per_pair, out.logps[groups], count, **batch_values)))
        metrics["num_tokens/chosen"] = count[:, 0].sum()
        metrics["num_tokens/rejected"] = count[:, 1].sum()
        if self.token_metrics:
            metrics.update(trl_token_metrics({name: out.stats[name][groups[:, :2]]
                                              for name in ("count", *TOKEN_METRIC_STATS)}))
        return out.loss, metrics

    def _strategy(self):
        strategy = self.strategy or get_settings().strategy
        if strategy == "auto" and self.batch_coupled:
            return "sliced"  # one head over the whole batch, on the fastest path that has one
        if strategy == "budget" and self.batch_coupled:
            warnings.warn(f"loss_type {self.loss_type!r} couples the pairs of a batch (AOT sorts across it), so it "
                          "cannot run chunk by chunk; using the lean strategy", stacklevel=3)
            return "lean"
        return strategy

    def _wpo_weights(self, stats):
        """WPO's pair weight w_chosen * w_rejected (prefops.losses.wpo_weights) over every completion token."""
        if not self.wpo:
            return None
        # The lengths were checked before the fused pass: no device read per chunk.
        per_sequence = wpo_weights(stats["logp"], stats["log_sum_p2"], stats["count"], check=False)
        return per_sequence[:, 0] * per_sequence[:, 1]

    def _lengths(self, targets, seq_ids, pairs, nll_targets):
        """Counted tokens per pair [P, 2] (chosen, rejected) and, with nll_targets, the chosen sequences'
        counted nll_targets [P] (else None); the group's totals under a sequence_group, in one collective."""
        ignore_index = self.options["ignore_index"]
        counts = _sequence_totals((targets != ignore_index).float(), seq_ids, 2 * pairs)
        if nll_targets is not None:
            nll_counts = _sequence_totals((nll_targets != ignore_index).float(), seq_ids, 2 * pairs)
            counts = torch.cat([counts, nll_counts[:pairs]])
        counts = sequence_all_reduce(counts, self.sequence_group)
        return counts[:2 * pairs].view(2, pairs).t(), None if nll_targets is None else counts[2 * pairs:]

    def _nll_rows(self, targets, seq_ids, pairs, nll_targets, vocab):
        """Flat indices of the chosen sequences' counted nll_targets tokens (None without nll_targets)."""
        if nll_targets is None:
            return None
        if self.token_level:
            raise ValueError("nll_targets is not available for the TDPO losses (they have no NLL term)")
        names = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if not has_nll_term(names, {**PARAM_DEFAULTS, **self.params}):
            raise ValueError(f"nll_targets is given but loss_type {self.loss_type!r} has no NLL term; the NLL terms "
                             "are 'sft', 'cpo' (cpo_alpha > 0) and 'orpo' (orpo_nll=True)")
        if not isinstance(nll_targets, torch.Tensor) or tuple(nll_targets.shape) != tuple(targets.shape) \
                or nll_targets.dtype.is_floating_point:
            raise ValueError(f"nll_targets must be an integer tensor of the shape of targets {tuple(targets.shape)}")
        check_targets_in_range(nll_targets, vocab, self.options["ignore_index"], name="nll_targets")
        sequence = _flat_seq_ids(targets, seq_ids)
        chosen = (nll_targets.reshape(-1) != self.options["ignore_index"]) & (sequence >= 0) & (sequence < pairs)
        return chosen.nonzero().squeeze(1)

    def _token_weights(self, targets, seq_ids, token_weights):
        token_weights = check_token_weights(token_weights, targets)
        if self.ld_alpha is None:
            return token_weights
        if seq_ids is not None:
            raise ValueError("ld_alpha needs the padded [chosen; rejected] layout (seq_ids given)")
        counted = targets != self.options["ignore_index"]
        pairs = targets.shape[0] // 2
        chosen, rejected = ld_dpo_token_weights(counted[:pairs], counted[pairs:], self.ld_alpha)
        ld_weights = torch.cat([chosen, rejected])
        return ld_weights if token_weights is None else ld_weights * token_weights

    @torch.no_grad()
    def _tgdpo_weights(self, targets, seq_ids, pairs, token_weights, token_rewards, ref_hidden, ref_weight, ref_bias,
                       rm_hidden, rm_weight, rm_bias):
        """token_weights times TGDPO's 1 ± αβ r̂_t (+ on chosen tokens, - on rejected ones)."""
        given = token_rewards is not None or rm_hidden is not None
        if self.tgdpo_alpha is None:
            if given:
                raise ValueError("token_rewards / rm_hidden are TGDPO inputs: set tgdpo_alpha in PreferenceLoss")
            return token_weights
        counted = targets != self.options["ignore_index"]
        if token_rewards is None:
            if rm_hidden is None or rm_weight is None or ref_hidden is None or ref_weight is None:
                raise ValueError("tgdpo_alpha needs token_rewards, or rm_hidden and rm_weight with ref_hidden and "
                                 "ref_weight (the rewards are log π_rm(y_t) - log π_ref(y_t))")
            rm_logps = linear_logprobs(rm_hidden, rm_weight, targets, bias=rm_bias, **self.options)
            ref_logps = linear_logprobs(ref_hidden, ref_weight, targets, bias=ref_bias, **self.options)
            token_rewards = tgdpo_token_rewards(rm_logps, ref_logps, counted)
        elif tuple(token_rewards.shape) != tuple(targets.shape):
            raise ValueError(f"token_rewards must have the shape of targets {tuple(targets.shape)}; "
                             f"got {tuple(token_rewards.shape)}")
        if seq_ids is None:
            chosen = (torch.arange(targets.shape[0], device=targets.device) < pairs)[:, None].expand_as(targets)
        else:
            chosen = seq_ids < pairs
        sign = torch.where(chosen, 1.0, -1.0)
        weights = 1 + sign * (self.tgdpo_alpha * self.beta) * token_rewards.float()
        return weights if token_weights is None else weights * token_weights

    def _token_level_forward(self, spec, per_pair, batch_values, hidden, weight, targets, bias, seq_ids, pairs,
                             groups, token_weights, ref_chosen, ref_rejected, ref_hidden, ref_weight, ref_bias):
        """TDPO: per-token KL, policy and reference log-probs from one fused pass (lean: prefops.linear_token_kl;
        budget: whole pairs' policy and reference logits materialised), then the pairwise loss."""
        if ref_hidden is None or ref_weight is None:
            raise ValueError(f"loss_type {self.loss_type!r} needs ref_hidden and ref_weight: the per-token KL needs "
                             "the reference's whole next-token distribution, not only ref_chosen_logps")
        if ref_chosen is not None or ref_rejected is not None:
            raise ValueError("pass either ref_hidden/ref_weight or ref_chosen_logps/ref_rejected_logps, not both")

        def values(logps, stats, group_index=None):
            ref, kl = stats["ref_logp"], stats["kl"]
            return _pair_values(per_pair, logps, stats["count"], group_index, ref_chosen_logps=ref[:, 0],
                                ref_rejected_logps=ref[:, 1], chosen_seq_kl=kl[:, 0], rejected_seq_kl=kl[:, 1],
                                **batch_values)

        def head(logps, group_index, stats):
            return spec.losses(spec.batch(values(logps, stats, group_index))).sum() / pairs

        out = sequence_kl_objective(hidden, weight, ref_hidden, ref_weight, targets, head=head, groups=groups,
                                    seq_ids=seq_ids, token_weights=token_weights, bias=bias, ref_bias=ref_bias,
                                    direction=self.kl_direction, strategy=self._strategy(), budget=self.budget,
                                    sequence_group=self.sequence_group, **self.options)
        stats = {name: out.stats[name][groups] for name in ("count", "ref_logp", "kl")}
        metrics = spec.metrics(spec.batch(values(out.logps[groups], stats)))
        metrics["num_tokens/chosen"] = stats["count"][:, 0].sum()
        metrics["num_tokens/rejected"] = stats["count"][:, 1].sum()
        return out.loss, metrics

    def _reference(self, targets, seq_ids, token_weights, ref_chosen, ref_rejected, ref_hidden, ref_weight,
                   ref_bias, pairs):
        given = ref_chosen is not None or ref_rejected is not None
        sums = reference_logps(ref_hidden, ref_weight, targets,
                               precomputed=given and "ref_chosen_logps/ref_rejected_logps", seq_ids=seq_ids,
                               num_sequences=2 * pairs, token_weights=token_weights, bias=ref_bias,
                               sequence_group=self.sequence_group, **self.options)
        if sums is not None:
            return sums[:pairs], sums[pairs:]
        if self.needs_reference and (ref_chosen is None or ref_rejected is None):
            raise ValueError(f"loss_type {self.loss_type!r} needs the reference: pass ref_chosen_logps and "
                             "ref_rejected_logps, or ref_hidden and ref_weight")
        for name, value in (("ref_chosen_logps", ref_chosen), ("ref_rejected_logps", ref_rejected)):
            if value is not None and tuple(value.shape) != (pairs,):
                raise ValueError(f"{name} must have shape [P] = ({pairs},); got {tuple(value.shape)}")
        return ref_chosen, ref_rejected


def check_token_weights(token_weights, targets, name="token_weights"):
    """token_weights (None, or a tensor of the shape of targets) as detached fp32."""
    if token_weights is None:
        return None
    if not isinstance(token_weights, torch.Tensor) or tuple(token_weights.shape) != tuple(targets.shape):
        raise ValueError(f"{name} must be a tensor of the shape of targets {tuple(targets.shape)}")
    return token_weights.detach().float()


def _flat_seq_ids(targets, seq_ids):
    if seq_ids is not None:
        return seq_ids.reshape(-1)
    return torch.arange(targets.shape[0], device=targets.device).repeat_interleave(targets.shape[1])


def _append_nll_sequences(hidden, targets, seq_ids, token_weights, groups, nll_targets, rows):
    """The packed batch plus, as sequences 2P..3P-1 (unweighted), the chosen sequences' nll_targets
    tokens at `rows`; groups [P, 3] (chosen, rejected, chosen's NLL)."""
    pairs = groups.shape[0]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    sequence = _flat_seq_ids(targets, seq_ids)
    if token_weights is not None:
        token_weights = torch.cat([token_weights.reshape(-1), token_weights.new_ones(rows.shape[0])])
    return (torch.cat([flat_hidden, flat_hidden[rows]]),
            torch.cat([targets.reshape(-1), nll_targets.reshape(-1)[rows]]),
            torch.cat([sequence, sequence[rows] + 2 * pairs]), token_weights,
            torch.cat([groups, groups[:, :1] + 2 * pairs], 1))


def trl_token_metrics(stats):
    """TRL's token metrics from per-sequence sums {name: [P, 2]} (columns chosen, rejected) of
    TOKEN_METRIC_STATS and 'count': token sums over the batch / token counts, 0 with no token."""
    count = stats["count"]

    def per_token(total, tokens):
        return torch.where(tokens > 0, total / tokens.clamp_min(1), 0.0)

    return {"entropy": per_token(stats["entropy"].sum(), count.sum()),
            "logits/chosen": per_token(stats["mean_logit"][:, 0].sum(), count[:, 0].sum()),
            "logits/rejected": per_token(stats["mean_logit"][:, 1].sum(), count[:, 1].sum()),
            "mean_token_accuracy": per_token(stats["top1"][:, 0].sum(), count[:, 0].sum())}


def _sequence_totals(values, seq_ids, num_sequences):
    """Per-sequence sums of per-token values (already weighted and zero off the completions), without
    a host read (num_sequences comes from the largest of seq_ids)."""
    if seq_ids is None:
        return values.sum(-1)
    return _per_sequence(values.reshape(-1), seq_ids.reshape(-1), num_sequences)


def _pair_values(per_pair, logps, count, group_index=None, **values):
    """pairwise_loss's tensors for the pairs group_index (None: all of them) from the objective's sums
    and counts [G', K] (columns chosen, rejected and, when K = 3, the chosen sequence's NLL tokens):
    per_pair [P] tensors picked for those pairs, plus `values` as given."""
    values.update({name: value if group_index is None else value[group_index] for name, value in per_pair.items()})
    values.update(chosen_logps=logps[:, 0], rejected_logps=logps[:, 1], chosen_lengths=count[:, 0],
                  rejected_lengths=count[:, 1])
    if logps.shape[1] == 3:
        values.update(chosen_nll_logps=logps[:, 2], chosen_nll_lengths=count[:, 2])
    return values
