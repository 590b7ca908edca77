"""Reference log-probs: materialise the logits, log_softmax, gather.

Everything the fused ops compute has a reference here. They are simple on
purpose and use O(N x V) memory; tests and benchmarks compare against them.
Pass float64 inputs for a high-precision reference.
"""
from __future__ import annotations

import torch

from ..checks import check_linear_inputs, check_targets_in_range


def logits(hidden, weight, *, bias=None, temperature=1.0, softcap=None):
    """z = softcap * tanh((h W^T + b) / temperature / softcap), or (h W^T + b) / temperature."""
    z = torch.nn.functional.linear(hidden, weight, bias)
    if hidden.dtype in (torch.bfloat16, torch.float16):
        z = z.float()
    z = z / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def linear_logprobs(hidden, weight, targets, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                    return_lse=False, return_entropy=False):
    """Reference for prefops.linear_logprobs (same signature and outputs)."""
    if hidden.dtype != torch.float64:
        check_linear_inputs(hidden, weight, targets, bias, ignore_index=ignore_index,
                            temperature=temperature, softcap=softcap)
    check_targets_in_range(targets, weight.shape[0], ignore_index)
    z = logits(hidden, weight, bias=bias, temperature=temperature, softcap=softcap)
    logp_all = torch.log_softmax(z, dim=-1)
    counted = targets != ignore_index
    safe_targets = torch.where(counted, targets, torch.zeros_like(targets)).long()
    zero = logp_all.new_zeros(())
    logp = torch.where(counted, logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1), zero)
    if not (return_lse or return_entropy):
        return logp
    lse = torch.where(counted, torch.logsumexp(z, dim=-1), zero)
    entropy = torch.where(counted, -(logp_all.exp() * logp_all).sum(-1), zero)
    return logp, (lse if return_lse else None), (entropy if return_entropy else None)


def token_sum_p2(hidden, weight, targets, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None):
    """sum_v p_v^2 per token (0 where ignored): the WPO weighting statistic."""
    z = logits(hidden, weight, bias=bias, temperature=temperature, softcap=softcap)
    p = torch.softmax(z, dim=-1)
    return torch.where(targets != ignore_index, (p * p).sum(-1), p.new_zeros(()))


def token_metrics(hidden, weight, targets, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None):
    """(entropy, mean logit sum_v z_v / V, target-is-top-1) per token; 0 / False at ignored tokens.

    A target that ties the largest logit counts as top-1."""
    z = logits(hidden, weight, bias=bias, temperature=temperature, softcap=softcap)
    counted = targets != ignore_index
    picked = z.gather(-1, torch.where(counted, targets, 0)[..., None]).squeeze(-1)
    entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    return (torch.where(counted, entropy, 0.0), torch.where(counted, z.mean(-1), 0.0),
            counted & (picked >= z.max(-1).values))
