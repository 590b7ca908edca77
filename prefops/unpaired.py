"""UnpairedLoss: KTO and BCO fused from hidden states.

Each completion is its own loss group: a padded batch [N, T] (completion i is
row i) or flat tokens with seq_ids in [0, N), one bool label per completion
(True = desirable). Log-probs go through prefops.sequence_objective; the
reference comes as precomputed per-completion log-probs or as reference hidden
states + weight on the forward-only fused path. The losses themselves are
prefops.losses.kto_loss and prefops.losses.BCOLoss, exactly as on the reference path.
"""
from __future__ import annotations

import warnings

import torch

from .config import get_settings
from .losses import BCOLoss, kto_kl_estimate
from .losses.pairwise import compute_dtype
from .losses.unpaired import (check_kto_options, check_labels, kto_losses, kto_metrics, labels_present,
                              reference_point)
from .objective import reference_logps, sequence_logps, sequence_objective
from .sequence_group import check_sequence_group, max_over_group
from .vocab_parallel import check_vocab_group
from .preference import check_token_weights

UNPAIRED_LOSSES = ("kto", "apo_zero_unpaired", "bco")


class UnpairedLoss(torch.nn.Module):
    """loss, metrics = UnpairedLoss("kto", beta=0.1)(hidden, weight, targets, labels=..., ref_logps=..., kl=...)

    KTO's reference point z_0 is either given (`kl`, e.g. averaged over ranks, used as given)
    or estimated here from mismatched (prompt, completion) pairs: pass their policy
    hidden states and targets (`kl_hidden`, `kl_targets`, forward-only, no gradient)
    and their reference log-probs (`ref_kl_logps`) or reference hidden states (`ref_kl_hidden`);
    the estimate is max(0, mean log-ratio) (prefops.losses.kto_kl_estimate).
    token_weights / kl_token_weights ([...] like targets / kl_targets) multiply each token's
    log-prob in the sequence sums, as PreferenceLoss's token_weights (policy and, when computed
    here from hidden states, reference); precomputed ref_logps / ref_kl_logps must carry the
    same weights. Weights 1/n_i give length-normalised KTO (Liger's average_log_prob).
    BCO keeps its running mean reward δ_0 as module state (saved in the state dict).
    sequence_group: ranks that each hold a share of every completion's tokens (kl_hidden's too), as
        in prefops.PreferenceLoss (precomputed ref_logps / ref_kl_logps are whole completions' sums).
    vocab_group: every weight passed is this rank's vocabulary rows, as in prefops.PreferenceLoss.
    """

    def __init__(self, loss_type="kto", beta=0.1, *, desirable_weight=1.0, undesirable_weight=1.0,
                 ignore_index=-100, temperature=1.0, softcap=None, strategy=None, budget=None, sequence_group=None,
                 vocab_group=None):
        super().__init__()
        if loss_type not in UNPAIRED_LOSSES:
            raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(map(repr, UNPAIRED_LOSSES))}")
        self.loss_type, self.beta = loss_type, beta
        self.weights = dict(desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        self.options = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                            vocab_group=check_vocab_group(vocab_group))
        self.strategy, self.budget = strategy, budget
        self.sequence_group = check_sequence_group(sequence_group)
        self.bco = BCOLoss(beta) if loss_type == "bco" else None

    def forward(self, hidden, weight, targets, *, labels, bias=None, seq_ids=None, ref_logps=None, ref_hidden=None,
                ref_weight=None, ref_bias=None, kl=None, kl_hidden=None, kl_targets=None, kl_seq_ids=None,
                ref_kl_logps=None, ref_kl_hidden=None, token_weights=None, kl_token_weights=None):
        """Returns (mean loss over completions, metrics with TRL's KTO/BCO names)."""
        if seq_ids is None and targets.dim() != 2:
            raise ValueError("targets must be a padded batch [N, T] of completions, or pass seq_ids")
        count = targets.shape[0] if seq_ids is None else max_over_group(int(seq_ids.max()) + 1,
                                                                        self.sequence_group, targets.device)
        labels = check_labels(labels, (count,), targets.device, f"shape [N] = ({count},), one per completion")
        token_weights = check_token_weights(token_weights, targets)
        ref = self._reference(targets, seq_ids, count, token_weights, ref_logps, ref_hidden, ref_weight, ref_bias)
        kl = self._kl(kl, kl_hidden, kl_targets, kl_seq_ids, kl_token_weights, ref_kl_logps, ref_kl_hidden, weight,
                      bias, ref_weight, ref_bias)
        # The policy's sums come out of the fused pass in fp32; the losses run in the reference's dtype if wider.
        ref = ref.to(compute_dtype(ref))
        # Every check of the step, before the fused pass: the head that runs per chunk checks nothing.
        if self.bco is None:
            beta = check_kto_options(self.loss_type, self.beta, **self.weights)
            kl, kl_finite = reference_point(kl, self.loss_type, ref)
            present = labels_present(labels, kl, kl_finite)
        else:
            present = labels_present(labels)

        def head(logps, group_index, stats):
            policy, chunk_ref, chunk_labels = logps[:, 0].to(ref.dtype), ref[group_index], labels[group_index]
            if self.bco is not None:
                losses = self.bco.losses(policy, chunk_ref, chunk_labels)
            else:
                losses = kto_losses(policy, chunk_ref, chunk_labels, beta, kl, **self.weights)
            return losses.sum() / count

        strategy = self.strategy or get_settings().strategy
        if self.bco is not None and strategy == "auto":
            strategy = "sliced"  # the running mean needs the whole batch's rewards before any loss
        if self.bco is not None and strategy == "budget":
            # δ_0 must see the whole batch's rewards before any completion's loss, and the
            # budget strategy runs the head chunk by chunk.
            warnings.warn("loss_type 'bco' uses the lean strategy: its running mean needs the whole batch",
                          stacklevel=2)
            strategy = "lean"
        groups = torch.arange(count, device=targets.device)[:, None]
        out = sequence_objective(hidden, weight, targets, head=head, groups=groups, seq_ids=seq_ids, bias=bias,
                                 token_weights=token_weights, strategy=strategy, budget=self.budget,
                                 sequence_group=self.sequence_group, **self.options)
        policy = out.logps.to(ref.dtype)
        if self.bco is not None:
            metrics = self.bco.metrics(policy, ref, labels, present)
        else:
            metrics = kto_metrics(policy, ref, labels, beta, kl, present)
        metrics["num_tokens/chosen"] = torch.where(labels, out.stats["count"], 0.0).sum()
        metrics["num_tokens/rejected"] = torch.where(labels, 0.0, out.stats["count"]).sum()
        return out.loss, metrics

    def _reference(self, targets, seq_ids, count, token_weights, ref_logps, ref_hidden, ref_weight, ref_bias):
        sums = reference_logps(ref_hidden, ref_weight, targets, precomputed=ref_logps is not None and "ref_logps",
                               seq_ids=seq_ids, num_sequences=count, token_weights=token_weights, bias=ref_bias,
                               sequence_group=self.sequence_group, **self.options)
        if sums is not None:
            return sums
        if ref_logps is None:
            raise ValueError(f"loss_type {self.loss_type!r} needs the reference: pass ref_logps, or ref_hidden "
                             "and ref_weight")
        if tuple(ref_logps.shape) != (count,):
            raise ValueError(f"ref_logps must have shape [N] = ({count},); got {tuple(ref_logps.shape)}")
        return ref_logps

    @torch.no_grad()
    def _kl(self, kl, kl_hidden, kl_targets, kl_seq_ids, kl_token_weights, ref_kl_logps, ref_kl_hidden, weight,
            bias, ref_weight, ref_bias):
        if self.loss_type != "kto":
            return kl
        if kl_hidden is None:
            if kl is None:
                raise ValueError("loss_type 'kto' needs its reference point: pass kl, or kl_hidden and kl_targets "
                                 "(mismatched prompt-completion pairs) with ref_kl_logps or ref_kl_hidden")
            if kl_token_weights is not None:
                raise ValueError("kl_token_weights weigh kl_targets: pass them with kl_hidden, not with kl")
            return kl
        if kl is not None:
            raise ValueError("pass either kl or kl_hidden/kl_targets, not both")
        if kl_targets is None:
            raise ValueError("kl_hidden needs kl_targets")
        kl_token_weights = check_token_weights(kl_token_weights, kl_targets, "kl_token_weights")
        count = kl_targets.shape[0] if kl_seq_ids is None else max_over_group(int(kl_seq_ids.max()) + 1,
                                                                              self.sequence_group, kl_targets.device)
        sums = dict(seq_ids=kl_seq_ids, num_sequences=count, token_weights=kl_token_weights,
                    sequence_group=self.sequence_group, **self.options)
        policy = sequence_logps(kl_hidden, weight, kl_targets, bias=bias, **sums)
        if ref_kl_hidden is not None:
            ref_kl_logps = reference_logps(ref_kl_hidden, ref_weight, kl_targets, name="ref_kl_hidden", bias=ref_bias,
                                           precomputed=ref_kl_logps is not None and "ref_kl_logps", **sums)
        if ref_kl_logps is None:
            raise ValueError("kl_hidden needs the reference side: pass ref_kl_logps or ref_kl_hidden")
        return kto_kl_estimate(policy, ref_kl_logps)
