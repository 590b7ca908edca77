"""Self-play losses with one target per response: SPPO, GPO and SPO over a prompt's K samples.

They are listwise loss types (prefops.losses.listwise_loss, prefops.ListwiseLoss): a list is one
prompt's K sampled responses y_1..y_K, and its label ψ_k (the `scores` of a ranked row) is the
per-response value the loss regresses onto or is rewarded by, estimated from a pairwise judge's
P(y_k ≻ y_j) over the same K samples (response_targets; the online loop's `pairs: responses`).
Notation of listwise.py: Δ_k = log π_θ(y_k|x) - log π_ref(y_k|x), π_ref the reference of the round
(π_t under reference_update: round), η = 1/β as in the per-pair sppo of the pairwise family.

  sppo_response  Σ_k (Δ_k - (ψ_k - ½)/β)²,  ψ_k = P̂(y_k ≻ π_t | x) = (1/K) Σ_j P(y_k ≻ y_j)
                 Self-Play Preference Optimization for Language Model Alignment (Wu et al. 2024,
                 arXiv:2405.00675), Eq. 4.6 / Algorithm 1 with η = 1/β.
  gpo            Σ_k (Δ_k - ψ_k/β)²,  ψ_k = s(y_k ≻ π_t | x) = (1/K) Σ_j logit P(y_k ≻ y_j)
                 General Preference Optimization (Zhang et al. 2024, "General Preference Modeling with
                 Preference Representations for Aligning Language Models", arXiv:2410.02197): SPPO with the
                 preference score s, P(y ≻ y') = σ(s(y ≻ y')), in place of P - ½.
  spo            -Σ_k (ψ_k - ψ̄) log π_θ(y_k|x),  ψ_k the win rate as for sppo_response, ψ̄ its mean over the list
                 A Minimaximalist Approach to Reinforcement Learning from Human Feedback (Swamy et al. 2024,
                 arXiv:2401.04056): each trajectory's reward is its proportion of wins against the policy's
                 other samples. Reference-free.

How these differ from the pairwise family's sppo / sppo_hard (TRL's): those take one chosen and one
rejected response per row and push Δ_w to (p - ½)/β and Δ_l to -(p - ½)/β from the pair's own
P(y_w ≻ y_l); sppo_response regresses every sampled response onto its own win rate against all K
samples, P̂(y ≻ π_t), which is the quantity SPPO's update is defined with.

Our reading where the papers leave a choice: (1) the mean over j includes y_k itself, P = ½ and s = 0
(SPPO's Algorithm 1 averages over all K samples); a comparison the judge failed on is left out of the
mean. (2) GPO's log-partition term is taken as 0: s is antisymmetric, so E_{y~π_t} s(y ≻ π_t) = 0
(SPPO likewise replaces log Z by its value η/2 under the same symmetry). (3) SPO trains with PPO or SAC
in the paper; here one REINFORCE step per sample with the list-mean baseline ψ̄ (½ when every
comparison is answered, as P(i ≻ j) + P(j ≻ i) = 1), which keeps the gradient's expectation; the
samples are exactly on-policy only on a round's first step.
"""
from __future__ import annotations

import torch

from .listwise import IMPLICIT_REWARDS, LISTWISE_REFERENCE_FREE, ListBatch, _register

SELF_PLAY_LOSSES = ("sppo_response", "gpo", "spo")
# What each loss reads as ψ (response_targets' kind).
TARGETS = {"sppo_response": "win_rate", "gpo": "preference_score", "spo": "win_rate"}


def _present(b: ListBatch, values):
    return torch.where(b.mask, values, 0.0)


@_register("sppo_response")
def sppo_response_loss(b: ListBatch):
    """SPPO per response: Σ_k (Δ_k - (ψ_k - ½)/β)², ψ_k = P̂(y_k ≻ π_t) (module docstring)."""
    return _present(b, (b.logratios - (b.labels - 0.5) / b.beta) ** 2).sum(-1)


@_register("gpo")
def gpo_loss(b: ListBatch):
    """GPO: Σ_k (Δ_k - ψ_k/β)², ψ_k = s(y_k ≻ π_t) the mean preference score (module docstring)."""
    return _present(b, (b.logratios - b.labels / b.beta) ** 2).sum(-1)


@_register("spo")
def spo_loss(b: ListBatch):
    """SPO: -Σ_k (ψ_k - ψ̄) log π_θ(y_k), ψ_k the win rate, ψ̄ its list mean (module docstring)."""
    baseline = _present(b, b.labels).sum(-1, keepdim=True) / b.mask.sum(-1, keepdim=True)
    return -_present(b, (b.labels - baseline).detach() * b.logps).sum(-1)


LISTWISE_REFERENCE_FREE.append("spo")
IMPLICIT_REWARDS["spo"] = lambda b: b.logps  # what its policy gradient raises for the winners


def response_targets(preferences: torch.Tensor, kind: str) -> torch.Tensor:
    """ψ [P, K] from a judge's preferences [P, K, K] (P(y_i ≻ y_j); NaN where it failed), float64:

    win_rate          (1/K) Σ_j P(y_k ≻ y_j), the diagonal counting ½
    preference_score  (1/K) Σ_j logit P(y_k ≻ y_j), the diagonal counting 0
    the means over the comparisons that did not fail (NaN where all did). A preference score needs
    P in (0, 1): a judgement of exactly 0 or 1 has no finite score and raises, naming the prompt.
    """
    if kind not in ("win_rate", "preference_score"):
        raise ValueError(f"kind must be win_rate or preference_score; got {kind!r}")
    values = preferences.double().clone()
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"preferences must be [P, K, K]; got {list(values.shape)}")
    values.diagonal(dim1=1, dim2=2).fill_(0.5)
    if kind == "preference_score":
        certain = (values == 0) | (values == 1)
        if certain.any():
            p, i, j = certain.nonzero()[0].tolist()
            raise ValueError(f"preference_score is the mean logit of P(y_i > y_j); prompt {p}: P(y_{i} > y_{j}) = "
                             f"{values[p, i, j].item():g} has no finite logit: the judge must give probabilities "
                             "strictly between 0 and 1 (a pairwise judge)")
        values = torch.logit(values)
    return values.nanmean(dim=2)
