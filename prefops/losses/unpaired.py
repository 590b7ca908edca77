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

UNPAIRED_TYPES = ("kto", "apo_zero_unpaired")


def check_labels(labels, shape, device, expected: str) -> torch.Tensor:
    """labels as a bool tensor on `device` of `shape` (`expected` says which, for the error)."""
    labels = torch.as_tensor(labels, device=device)
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels must have {expected}; got {tuple(labels.shape)}")
    if labels.dtype != torch.bool:
        raise TypeError(f"labels must be a bool tensor (True = desirable); got {labels.dtype}")
    return labels


def _prepare(policy_logps, ref_logps, labels):
    dtype = compute_dtype(policy_logps, ref_logps)
    values = check_sequence_values({"policy_logps": policy_logps, "ref_logps": ref_logps}, dtype)
    shape = tuple(policy_logps.shape)
    return (values["policy_logps"], values["ref_logps"],
            check_labels(labels, shape, policy_logps.device, f"the shape of policy_logps {shape}"))


def labels_present(labels, kl=None, kl_finite=None) -> tuple[bool, bool]:
    """Whether any completion is desirable, and any undesirable (which metrics exist); with kl and
    kl_finite from reference_point, also the check that kl is finite: one host read for all of it."""
    read = torch.stack([labels.any(), (~labels).any(), *([] if kl_finite is None else [kl_finite])]).tolist()
    if not all(read[2:]):
        raise ValueError(f"kl must be finite; got {float(kl)}")
    return tuple(read[:2])


def _masked_mean(values, mask):
    return torch.where(mask, values, 0.0).sum() / mask.sum()


def unpaired_metrics(policy_logps, rewards, labels, extra, present):
    """TRL's KTO / BCO metric names: means over the desirable and the undesirable completions, for the
    groups that `present` (labels_present) says have any, so nothing here reads the device."""
    metrics = dict(extra)
    for name, group, any_present in (("chosen", labels, present[0]), ("rejected", ~labels, present[1])):
        if any_present:
            metrics[f"rewards/{name}"] = _masked_mean(rewards, group)
            metrics[f"logps/{name}"] = _masked_mean(policy_logps, group)
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


def check_kto_options(loss_type, beta, desirable_weight, undesirable_weight) -> float:
    """kto_loss's scalar options (beta returned as a float)."""
    if loss_type not in UNPAIRED_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: 'apo_zero_unpaired', 'kto'")
    beta = check_beta(beta)
    check_in_range(desirable_weight, "desirable_weight", 0.0, float("inf"), high_open=True)
    check_in_range(undesirable_weight, "undesirable_weight", 0.0, float("inf"), high_open=True)
    return beta


def reference_point(kl, loss_type, like: torch.Tensor):
    """KTO's z_0 as a detached 0-dim tensor like `like` (0 for apo_zero_unpaired), and whether it is
    finite (a 0-dim bool tensor for labels_present; None for apo_zero_unpaired)."""
    if loss_type != "kto":
        return like.new_zeros(()), None
    if kl is None:
        raise ValueError("kto_loss needs kl (the reference point; see kto_kl_estimate)")
    # A number is filled in on the device: a tensor made from it would be a host-to-device copy.
    kl = like.new_full((), kl) if isinstance(kl, (int, float)) else torch.as_tensor(kl, dtype=like.dtype,
                                                                                   device=like.device).detach()
    if kl.numel() != 1:
        raise ValueError(f"kl must be a scalar; got shape {tuple(kl.shape)}")
    kl = kl.reshape(())
    return kl, torch.isfinite(kl)


def kto_losses(policy, ref, labels, beta, kl, desirable_weight, undesirable_weight):
    """kto_loss's per-completion losses from checked inputs (kl from reference_point), checking nothing."""
    shifted = policy - ref - kl
    # 1 - σ(x) written as σ(-x): no cancellation (and a gradient) when σ saturates near 1.
    desirable = torch.sigmoid(-beta * shifted)
    undesirable = torch.sigmoid(beta * shifted)
    if desirable_weight != 1:
        desirable = desirable_weight * desirable
    if undesirable_weight != 1:
        undesirable = undesirable_weight * undesirable
    return torch.where(labels, desirable, undesirable)


@torch.no_grad()
def kto_metrics(policy, ref, labels, beta, kl, present):
    """kto_loss's metrics from checked inputs (present from labels_present)."""
    return unpaired_metrics(policy, beta * (policy - ref), labels, {"kl": kl}, present)


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
    beta = check_kto_options(loss_type, beta, desirable_weight, undesirable_weight)
    policy, ref, labels = _prepare(policy_logps, ref_logps, labels)
    kl, finite = reference_point(kl, loss_type, policy)
    present = labels_present(labels, kl, finite)
    losses = kto_losses(policy, ref, labels, beta, kl, desirable_weight, undesirable_weight)
    return losses, kto_metrics(policy, ref, labels, beta, kl, present)


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
        losses = self.losses(policy, ref, labels)
        return losses, self.metrics(policy, ref, labels, labels_present(labels))

    def losses(self, policy, ref, labels):
        """forward's losses from checked inputs (and the running-mean update in train mode), checking nothing."""
        rewards = self.beta * (policy - ref)
        if self.training and rewards.numel():
            with torch.no_grad():
                total = self.count + rewards.numel()
                self.delta += (rewards.double().mean() - self.delta) * rewards.numel() / total
                self.count.copy_(total)
        shifted = rewards - self.delta.to(rewards.dtype)
        return torch.where(labels, -F.logsigmoid(shifted), -F.logsigmoid(-shifted))

    @torch.no_grad()
    def metrics(self, policy, ref, labels, present):
        """forward's metrics (the running mean as it is now), with `present` from labels_present."""
        return unpaired_metrics(policy, self.beta * (policy - ref), labels, {"delta": self.delta.clone()}, present)
