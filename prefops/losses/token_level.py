"""Token-level preference losses: TDPO (per-token KL to the reference) and TGDPO (token-reward weights).

Notation as in prefops/losses/pairwise.py: Δ_w, Δ_l are the chosen and rejected
log-ratio sums Σ_t (log π_θ(y_t) - log π_ref(y_t)), σ the logistic function.
SeqKL = Σ_t KL(π_ref(·|x, y_<t) || π_θ(·|x, y_<t)) over a completion's tokens, from
prefops.linear_token_kl. Pure functions over sequence- or token-level tensors; the
fused path (PreferenceLoss) and the reference path share them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TDPO_VARIANTS = ("tdpo1", "tdpo2")


def tdpo_loss(chosen_logratios, rejected_logratios, chosen_seq_kl, rejected_seq_kl, *, beta, alpha=0.5,
              variant="tdpo2"):
    """TDPO per pair, with m = Δ_w - Δ_l:

        TDPO1: -log σ(β [m - (SeqKL_l - SeqKL_w)])
        TDPO2: -log σ(β [m - α (SeqKL_l - sg(SeqKL_w))])     (sg: stop-gradient)

    Token-level Direct Preference Optimization (Zeng et al., ICML 2024, arXiv:2404.11999);
    SeqKL uses KL(π_ref || π_θ) per position, as the authors' code. α only enters TDPO2.
    """
    margin = chosen_logratios - rejected_logratios
    if variant == "tdpo1":
        kl_term = rejected_seq_kl - chosen_seq_kl
    elif variant == "tdpo2":
        kl_term = alpha * (rejected_seq_kl - chosen_seq_kl.detach())
    else:
        raise ValueError(f"variant must be one of {', '.join(map(repr, TDPO_VARIANTS))}; got {variant!r}")
    return -F.logsigmoid(beta * (margin - kl_term))


def tgdpo_token_rewards(rm_token_logps, ref_token_logps, mask=None):
    """TGDPO token rewards r̂_t = log π_rm(y_t) - log π_ref(y_t), 0 off the mask (no gradient).

    TGDPO: Harnessing Token-Level Reward Guidance for Enhancing Direct Preference
    Optimization (Zhu et al., ICML 2025, arXiv:2506.14574):
    π_rm is a third model (e.g. a DPO-trained one) whose per-token log-ratio against the
    reference is an implicit token-level reward. Compute rm_token_logps with the
    forward-only fused op (prefops.linear_logprobs under torch.no_grad()).
    """
    if tuple(rm_token_logps.shape) != tuple(ref_token_logps.shape):
        raise ValueError(f"rm_token_logps must have the shape of ref_token_logps {tuple(ref_token_logps.shape)}; "
                         f"got {tuple(rm_token_logps.shape)}")
    rewards = (rm_token_logps - ref_token_logps).detach()
    return rewards if mask is None else torch.where(mask.bool(), rewards, 0.0)


def tgdpo_token_weights(chosen_token_rewards, rejected_token_rewards, *, beta, alpha):
    """Per-token weights (1 + αβ r̂_w,t) on the chosen and (1 - αβ r̂_l,t) on the rejected log-ratios.

    With them, DPO's -log σ(β (Σ_t u_w,t Δ_w,t - Σ_t u_l,t Δ_l,t)) is TGDPO's loss
    -log σ(Σ_t β(1 + αβ r̂_w,t) Δ_w,t - Σ_t β(1 - αβ r̂_l,t) Δ_l,t) (arXiv:2506.14574).
    Apply the same weights to the policy and the reference token log-probs.
    """
    scale = alpha * beta
    return 1 + scale * chosen_token_rewards, 1 - scale * rejected_token_rewards


def tgdpo_loss(chosen_token_logratios, rejected_token_logratios, chosen_token_rewards, rejected_token_rewards, *,
               beta, alpha):
    """TGDPO per pair from per-token log-ratios Δ_t [P, T] (0 off the completion) and token rewards r̂ [P, T]:

        -log σ(Σ_t β (1 + αβ r̂_w,t) Δ_w,t - Σ_t β (1 - αβ r̂_l,t) Δ_l,t)

    TGDPO (arXiv:2506.14574), with its reward guidance from an induced DPO reward; α = 0 is DPO.
    """
    chosen_weights, rejected_weights = tgdpo_token_weights(chosen_token_rewards, rejected_token_rewards, beta=beta,
                                                           alpha=alpha)
    chosen = (chosen_weights * chosen_token_logratios).sum(-1)
    rejected = (rejected_weights * rejected_token_logratios).sum(-1)
    return -F.logsigmoid(beta * (chosen - rejected))
