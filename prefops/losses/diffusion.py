"""Preference losses for diffusion models, on per-sample denoising errors.

A diffusion model has no sequence log-probability; its ELBO stand-in is the
denoising error e = ||ε - ε_θ(x_t, t)||² (averaged over the sample's elements)
at a sampled timestep. Inputs are these errors, one value per sample [P], for
the preferred (w) and dispreferred (l) sample of each pair.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .pairwise import check_beta, check_sequence_values, compute_dtype


def diffusion_dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, *, beta=2.5, num_timesteps=1000):
    """Diffusion-DPO: -log σ(-β T [(e_θ,w - e_ref,w) - (e_θ,l - e_ref,l)]).

    Diffusion Model Alignment Using Direct Preference Optimization (arXiv:2311.12908), Eq. 14
    with ω(λ_t) = 1. The defaults give β T = 2500, the scale of the authors' SD1.5 runs
    (their script writes it as 0.5 · beta_dpo with beta_dpo = 5000).

    Returns (losses [P], metrics): "implicit_acc" (fraction of pairs the model already
    ranks right), "model_diff" and "ref_diff" (means of e_w - e_l).
    """
    scale = check_beta(beta) * check_beta(num_timesteps, "num_timesteps")
    values = check_sequence_values(
        {"model_err_w": model_err_w, "model_err_l": model_err_l, "ref_err_w": ref_err_w, "ref_err_l": ref_err_l},
        compute_dtype(model_err_w, model_err_l, ref_err_w, ref_err_l))
    model_diff = values["model_err_w"] - values["model_err_l"]
    ref_diff = values["ref_err_w"] - values["ref_err_l"]
    inside = -scale * (model_diff - ref_diff)
    metrics = {"implicit_acc": (inside > 0).to(inside.dtype).mean(), "model_diff": model_diff.mean(),
               "ref_diff": ref_diff.mean()}
    return -F.logsigmoid(inside), {k: v.detach() for k, v in metrics.items()}


def _x_over_expm1(x):
    """x / (e^x - 1), continuous at 0 where it is 1 (Taylor series near 0 avoids 0/0)."""
    small = x.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1 - x / 2 + x * x / 12, safe / torch.expm1(safe))


def mapo_loss(model_err_w, model_err_l, *, beta=0.1, snr_value=1.0, num_timesteps=1000):
    """MaPO: e_w - β log σ(T [g(c e_w) - g(c e_l)]), g(x) = x / (e^x - 1), c = snr_value.

    Margin-aware Preference Optimization for Aligning Diffusion Models without
    Reference (arXiv:2406.06424). g(c e) is the likelihood stand-in from the
    denoising error; multiplying the margin by T keeps it over the whole denoising
    chain. Reference-free: the first term fits the preferred sample, the second
    widens its margin over the dispreferred one.

    Returns (losses [P], metrics): "ratio_loss" (mean of -β log σ(·)), "model_err_w",
    "model_err_l" (means).
    """
    beta = check_beta(beta)
    scale = check_beta(snr_value, "snr_value")
    steps = check_beta(num_timesteps, "num_timesteps")
    values = check_sequence_values({"model_err_w": model_err_w, "model_err_l": model_err_l},
                                   compute_dtype(model_err_w, model_err_l))
    err_w, err_l = values["model_err_w"], values["model_err_l"]
    log_odds = _x_over_expm1(scale * err_w) - _x_over_expm1(scale * err_l)
    ratio_loss = -beta * F.logsigmoid(steps * log_odds)
    metrics = {"ratio_loss": ratio_loss.mean(), "model_err_w": err_w.mean(), "model_err_l": err_l.mean()}
    return err_w + ratio_loss, {k: v.detach() for k, v in metrics.items()}
