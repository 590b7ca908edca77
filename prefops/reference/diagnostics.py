"""Reference diagnostics: materialise the logits, then compute each quantity the naive way.

References for prefops.linear_diagnostics (same definitions: natural log, top-k entropy
of the renormalised top-k distribution) and prefops.ches_scores (a loop over pairs).
Pass float64 inputs for a high-precision reference.
"""
from __future__ import annotations

import torch

from .logprobs import linear_logprobs, logits


def linear_diagnostics(hidden, weight, targets, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                       top_k=10, ref_hidden=None, ref_weight=None, ref_bias=None, kl_direction="policy_ref"):
    """Dict of per-token logp, entropy, top_k_entropy, top_k_mass, sum_p2, top_k_logp, top_k_ids and, with a
    reference model, kl_to_reference (0, or -1 for ids, where ignored)."""
    z = logits(hidden, weight, bias=bias, temperature=temperature, softcap=softcap)
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    top_logp, top_ids = log_p.topk(top_k, dim=-1)
    top_p = top_logp.exp()
    mass = top_p.sum(-1)
    q = top_p / mass[..., None]
    logp, _, entropy = linear_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                       temperature=temperature, softcap=softcap, return_entropy=True)
    counted = targets != ignore_index
    zero = lambda x: torch.where(counted.view(counted.shape + (1,) * (x.dim() - counted.dim())), x,  # noqa: E731
                                 torch.zeros_like(x))
    kl = None
    if ref_hidden is not None:
        ref_log_p = torch.log_softmax(logits(ref_hidden, ref_weight, bias=ref_bias, temperature=temperature,
                                             softcap=softcap), dim=-1)
        first, second = (log_p, ref_log_p) if kl_direction == "policy_ref" else (ref_log_p, log_p)
        kl = zero((first.exp() * (first - second)).sum(-1))
    return {
        "kl_to_reference": kl,
        "logp": logp,
        "entropy": entropy,
        "top_k_entropy": zero(-torch.special.xlogy(q, q).sum(-1)),
        "top_k_mass": zero(mass),
        "sum_p2": zero((p * p).sum(-1)),
        "top_k_logp": zero(top_logp),
        "top_k_ids": torch.where(counted[..., None], top_ids, torch.full_like(top_ids, -1)),
    }


def ches_scores(hidden_chosen, hidden_rejected, mask_chosen, mask_rejected, *, normalized=False):
    """CHES (or length-normalised ln-CHES) per pair, one pair at a time in the input dtype."""
    scores = []
    for h_plus, h_minus, m_plus, m_minus in zip(hidden_chosen, hidden_rejected, mask_chosen, mask_rejected):
        s_plus, s_minus = h_plus[m_plus].sum(0), h_minus[m_minus].sum(0)
        if normalized:
            s_plus, s_minus = s_plus / m_plus.sum(), s_minus / m_minus.sum()
        scores.append(torch.dot(s_plus, s_minus) - torch.dot(s_plus, s_plus))
    return torch.stack(scores)
