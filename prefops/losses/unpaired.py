"""Unpaired preference losses: each completion is labelled desirable or not on its own.

Inputs are sequence-level like the pairwise losses: policy and reference
log-probs summed over each completion's tokens, shape [N], with a bool label
per completion (True = desirable). Losses come back per completion, in input
order; the batch loss is their mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .pairwise import check_beta, check_in_range, check_sequence_values, compute_dtype


def _prepare(policy_logps, ref_logps, labels):
    dtype = compute_dtype(policy_logps, ref_logps)
    values = check_sequence_values({"policy_logps": policy_logps, "ref_logps": ref_logps}, dtype)
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels, device=policy_logps.device)
    if labels.dtype != torch.bool:
        raise TypeError(f"labels must be a bool tensor (True = desirable); got {labels.dtype}")
    if tuple(labels.shape) != tuple(policy_logps.shape):
        raise ValueError(f"labels must have the shape of policy_logps {tuple(policy_logps.shape)}; "
                         f"got {tuple(labels.shape)}")
    return values["policy_logps"], values["ref_logps"], labels


def _unpaired_metrics(policy_logps, rewards, labels, extra):
    """TRL's KTO / BCO metric names: means over the desirable and the undesirable completions."""
    metrics = dict(extra)
    for name, group in (("chosen", labels), ("rejected", ~labels)):
        if bool(group.any()):
            metrics[f"rewards/{name}"] = rewards[group].mean()
            metrics[f"logps/{name}"] = policy_logps[group].mean()
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return {k: torch.as_tensor(v).detach() for k, v in metrics.items()}


def kto_kl_estimate(policy_kl_logps, ref_kl_logps):
    """KTO's reference point z_0 = max(0, mean log-ratio on mismatched (prompt, completion) pairs), detached.

    The batch mean estimates KL(π_θ || π_ref) >= 0 but can fall below 0, so KTO
    (arXiv:2402.01306) and TRL clamp the estimate. Under data parallelism TRL averages the
    unclamped means over ranks and clamps the average: to match it, all-reduce
    (policy_kl_logps - ref_kl_logps).mean() and pass the clamped average to kto_loss.
    """
    values = check_sequence_values({"policy_kl_logps": policy_kl_logps, "ref_kl_logps": ref_kl_logps},
                                   compute_dtype(policy_kl_logps, ref_kl_logps))
    return (values["policy_kl_logps"] - values["ref_kl_logps"]).mean().detach().clamp(min=0)


def kto_loss(policy_logps, ref_logps, labels, *, beta=0.1, kl=None, desirable_weight=1.0, undesirable_weight=1.0,
             loss_type="kto"):
    """KTO: λ_D (1 - σ(β (Δ - z_0))) if desirable, λ_U (1 - σ(β (z_0 - Δ))) if not; Δ = log π - log π_ref.

    KTO: Model Alignment as Prospect Theoretic Optimization (arXiv:2402.01306), Eq. 7.
    z_0 = kl, a finite scalar used as given (detached), as Liger's KTO: the paper's clamp at 0
    belongs to the estimate of the KL (kto_kl_estimate, TRL's KTOTrainer), and a value the
    caller gives is either that estimate already or a reference point chosen on purpose.
    loss_type="apo_zero_unpaired" drops z_0: 1 - σ(β Δ) if desirable, σ(β Δ) if not
    (Anchored Preference Optimization and Contrastive Revisions, arXiv:2408.06266).

    Returns (losses [N], metrics with TRL's names plus "kl").
    """
    if loss_type not in ("kto", "apo_zero_unpaired"):
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: 'apo_zero_unpaired', 'kto'")
    beta = check_beta(beta)
    check_in_range(desirable_weight, "desirable_weight", 0.0, float("inf"), high_open=True)
    check_in_range(undesirable_weight, "undesirable_weight", 0.0, float("inf"), high_open=True)
    policy, ref, labels = _prepare(policy_logps, ref_logps, labels)
    logratios = policy - ref
    if loss_type == "kto":
        if kl is None:
            raise ValueError("kto_loss needs kl (the reference point; see kto_kl_estimate)")
        kl = torch.as_tensor(kl, dtype=policy.dtype, device=policy.device).detach()
        if kl.numel() != 1:
            raise ValueError(f"kl must be a scalar; got shape {tuple(kl.shape)}")
        if not bool(torch.isfinite(kl).all()):
            raise ValueError(f"kl must be finite; got {float(kl)}")
        kl = kl.reshape(())
        shifted = logratios - kl
    else:
        kl = policy.new_zeros(())
        shifted = logratios
    # 1 - σ(x) written as σ(-x): no cancellation (and a gradient) when σ saturates near 1.
    desirable = desirable_weight * torch.sigmoid(-beta * shifted)
    undesirable = undesirable_weight * torch.sigmoid(beta * shifted)
    losses = torch.where(labels, desirable, undesirable)
    with torch.no_grad():
        metrics = _unpaired_metrics(policy, beta * logratios, labels, {"kl": kl})
    return losses, metrics


class BCOLoss(torch.nn.Module):
    """BCO: -log σ(β Δ - δ_0) if desirable, -log σ(-(β Δ - δ_0)) if not.

    Binary Classifier Optimization for Large Language Model Alignment (arXiv:2404.04656).
    δ_0, the running mean of all implicit rewards β Δ seen in training, is a buffer
    (saved with the state dict); it is updated in train mode before use, frozen in eval
    mode, as TRL's BCOTrainer. Not included: TRL's UDM density-ratio weights, which need
    a classifier on prompt embeddings. Under data parallelism each rank keeps its own
    running mean (TRL gathers the rewards first).
    """

    def __init__(self, beta: float = 0.1):
        super().__init__()
        self.beta = check_beta(beta)
        self.register_buffer("delta", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def forward(self, policy_logps, ref_logps, labels):
        """Return (losses [N], metrics with TRL's names plus "delta")."""
        policy, ref, labels = _prepare(policy_logps, ref_logps, labels)
        rewards = self.beta * (policy - ref)
        if self.training and rewards.numel():
            with torch.no_grad():
                total = self.count + rewards.numel()
                self.delta += (rewards.double().mean() - self.delta) * rewards.numel() / total
                self.count.copy_(total)
        shifted = rewards - self.delta.to(rewards.dtype)
        losses = torch.where(labels, -F.logsigmoid(shifted), -F.logsigmoid(-shifted))
        with torch.no_grad():
            metrics = _unpaired_metrics(policy, rewards, labels, {"delta": self.delta.clone()})
        return losses, metrics
