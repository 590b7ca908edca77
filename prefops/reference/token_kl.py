"""Reference per-token KL: materialise both logits tensors, log_softmax, sum over the vocabulary.

Reference for prefops.linear_token_kl (and the TDPO pipeline built on it). Uses
O(N x V) memory on purpose; pass float64 inputs for a high-precision reference.
"""
from __future__ import annotations

import torch

from .logprobs import logits


def linear_token_kl(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None, direction="ref_policy",
                    mask=None, targets=None, ignore_index=-100, temperature=1.0, softcap=None):
    """Same signature and outputs as prefops.linear_token_kl: KL [...], or (kl, logp, ref_logp) with targets."""
    transform = dict(temperature=temperature, softcap=softcap)
    log_p = torch.log_softmax(logits(hidden, weight, bias=bias, **transform), dim=-1)
    log_r = torch.log_softmax(logits(ref_hidden.detach(), ref_weight.detach(),
                                     bias=None if ref_bias is None else ref_bias.detach(), **transform), dim=-1)
    if log_r.dtype != log_p.dtype:
        log_r = log_r.to(log_p.dtype)
    if direction == "ref_policy":
        kl = (log_r.exp() * (log_r - log_p)).sum(-1)
    elif direction == "policy_ref":
        kl = (log_p.exp() * (log_p - log_r)).sum(-1)
    else:
        raise ValueError(f"direction must be 'ref_policy' or 'policy_ref'; got {direction!r}")
    counted = torch.ones(kl.shape, dtype=torch.bool, device=kl.device) if mask is None else mask.bool()
    if targets is None:
        return torch.where(counted, kl, 0.0)
    counted = counted & (targets != ignore_index)
    index = torch.where(counted, targets, 0).long().unsqueeze(-1)
    pick = lambda values: torch.where(counted, values.gather(-1, index).squeeze(-1), 0.0)  # noqa: E731
    return torch.where(counted, kl, 0.0), pick(log_p), pick(log_r)
