"""Token and sequence weighting helpers that feed the pairwise losses.

LD-DPO reweights tokens before they are summed into sequence log-probs;
WPO reweights whole pairs after, from per-sequence sums.
"""
from __future__ import annotations

import torch

from ..checks import run_value_checks
from .pairwise import check_in_range, lengths_check


def _check_mask(mask, name):
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"{name} must be a [B, T] tensor; got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    return mask.bool()


def ld_dpo_token_weights(chosen_mask, rejected_mask, alpha):
    """Per-token weights of LD-DPO: 1 on each pair's first min(n_w, n_l) completion tokens, α beyond, 0 off-mask.

    Length Desensitization in Directed Preference Optimization (arXiv:2409.06411):
    log π(y) = Σ_{t ≤ shared} log p_t + α Σ_{t > shared} log p_t, so the excess length
    of the longer response counts only α-fold. Apply the same weights to policy and
    reference tokens: `prefops.sequence_sum(token_logps, weights)`.

    chosen_mask [B, Tc], rejected_mask [B, Tr]: bool, True on completion tokens (pair b
    is row b of both). alpha in [0, 1]: 1 is plain DPO, 0 drops the excess tokens.
    Returns (chosen_weights [B, Tc], rejected_weights [B, Tr]) in fp32.
    """
    alpha = check_in_range(alpha, "alpha", 0.0, 1.0)
    chosen_mask = _check_mask(chosen_mask, "chosen_mask")
    rejected_mask = _check_mask(rejected_mask, "rejected_mask")
    if chosen_mask.shape[0] != rejected_mask.shape[0]:
        raise ValueError(f"chosen_mask and rejected_mask must have the same batch size; "
                         f"got {chosen_mask.shape[0]} and {rejected_mask.shape[0]}")
    shared = torch.minimum(chosen_mask.sum(1), rejected_mask.sum(1)).unsqueeze(1)

    def weigh(mask):
        position = mask.cumsum(1)  # 1-based index among the completion tokens
        weights = torch.where(position <= shared, 1.0, alpha)
        return torch.where(mask, weights, 0.0).float()

    return weigh(chosen_mask), weigh(rejected_mask)


def wpo_weights(policy_logps, log_sum_p2, lengths, *, check=True):
    """WPO sequence weight w = exp((Σ_t log p_t - Σ_t log Σ_v p_v²) / n), without gradient.

    WPO: Enhancing RLHF with Weighted Preference Optimization (arXiv:2406.11827), Eq. 2
    with TRL's alignment: log Σ_v p_v² is the log-probability of sampling the same token
    twice, so w ≤ 1 measures how on-policy the completion is. Pass
    `pair_weights=w_chosen * w_rejected` to pairwise_loss. The one WPO formula of prefops:
    PreferenceLoss (wpo=True) and the trainer's reference path call it.

    policy_logps, log_sum_p2, lengths: per-sequence sums over the completion tokens (unweighted,
    as TRL's use_weighting even with ld_alpha) and their counts n, any one shape, e.g. [B]
    (from [B, T] tokens: `prefops.sequence_sum(token_logps, mask)`). A sequence without
    completion tokens raises, naming it; check=False skips that device read (PreferenceLoss's
    fused head, whose lengths were checked before the pass). Returns fp32.
    """
    shapes = {tuple(value.shape) for value in (policy_logps, log_sum_p2, lengths)}
    if len(shapes) != 1:
        raise ValueError(f"policy_logps, log_sum_p2 and lengths must have one shape; got "
                         f"{tuple(policy_logps.shape)}, {tuple(log_sum_p2.shape)}, {tuple(lengths.shape)}")
    if check:
        run_value_checks([lengths_check(lengths.reshape(-1), "lengths")])
    with torch.no_grad():
        return ((policy_logps.float() - log_sum_p2.float()) / lengths.float()).exp()
