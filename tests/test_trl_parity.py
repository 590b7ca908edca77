"""Parity with TRL's own loss code on the same log-probs (skipped without the optional `trl` extra).

TRL computes its losses inside trainer methods, so each trainer is built with
object.__new__ and given only the attributes the method reads; a stand-in model
returns fixed per-token log-probs in the shape of TRL's fused LM head output.
"""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

from prefops.losses import kto_kl_estimate, kto_loss, ld_dpo_token_weights, pairwise_loss, wpo_weights  # noqa: E402

PAIRS, LENGTH, BETA = 5, 9, 0.2
DPO_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected"]


class Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


class FakeLMHead:
    """Returns fixed outputs keyed by the input_ids tensor it is called with."""

    training = True

    def __init__(self, outputs):
        self.outputs = outputs

    def __call__(self, input_ids, **kwargs):
        return self.outputs[id(input_ids)]


def head_output(log_probs, log_sum_sq_probs=None):
    zeros = torch.zeros_like(log_probs.detach())
    return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                           log_sum_sq_probs=log_sum_sq_probs)


def token_batch(seed, rows):
    """Per-token log-probs [rows, LENGTH - 1] (0 off the completion) and the completion mask [rows, LENGTH]."""
    g = torch.Generator().manual_seed(seed)
    completion = torch.zeros(rows, LENGTH, dtype=torch.bool)
    for i in range(rows):
        start = int(torch.randint(1, 4, (1,), generator=g))
        end = int(torch.randint(start + 1, LENGTH + 1, (1,), generator=g))
        completion[i, start:end] = True
    shifted = completion[:, 1:]
    token_logps = torch.where(shifted, -torch.rand(rows, LENGTH - 1, generator=g) * 3, 0.0)
    ref_logps = (token_logps.sum(1) + torch.randn(rows, generator=g)).detach()
    return token_logps, completion, ref_logps


def dpo_trainer(loss_type, **overrides):
    trainer = object.__new__(DPOTrainer)
    settings = dict(beta=BETA, loss_types=[loss_type] if isinstance(loss_type, str) else loss_type,
                    loss_weights=None, ld_alpha=None, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
                    label_smoothing=0.0, use_weighting=False, precompute_ref_logps=True, aux_loss_enabled=False,
                    accelerator=Accelerator(), args=SimpleNamespace(discopop_tau=0.05),
                    _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                    _tp_size=1)
    settings.update(overrides)
    if settings["loss_weights"] is None:
        settings["loss_weights"] = [1.0] * len(settings["loss_types"])
    trainer.__dict__.update(settings)
    return trainer


def run_trl_dpo(trainer, token_logps, completion, ref_logps, log_sum_sq_probs=None):
    input_ids = torch.zeros(2 * PAIRS, LENGTH, dtype=torch.long)
    trainer.model = FakeLMHead({id(input_ids): head_output(token_logps, log_sum_sq_probs)})
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "completion_mask": completion.long(),
              "ref_chosen_logps": ref_logps[:PAIRS], "ref_rejected_logps": ref_logps[PAIRS:]}
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def ours_dpo(loss_type, token_logps, completion, ref_logps, sums=None, **kw):
    mask = completion[:, 1:]
    sums = (token_logps * mask).sum(1) if sums is None else sums
    lengths = mask.sum(1)
    losses, metrics = pairwise_loss(sums[:PAIRS], sums[PAIRS:], ref_logps[:PAIRS], ref_logps[PAIRS:],
                                    loss_type=loss_type, beta=BETA, chosen_lengths=lengths[:PAIRS],
                                    rejected_lengths=lengths[PAIRS:], **kw)
    return losses.mean(), metrics


def assert_parity(trl_out, ours_out, token_logps, completion, tol=1e-5):
    (trl_loss, trl_metrics), (loss, metrics) = trl_out, ours_out
    assert math.isfinite(float(loss.detach()))
    assert abs(float(loss.detach() - trl_loss.detach())) <= tol * max(1.0, abs(float(trl_loss.detach())))
    # TRL sums every position (the LM head gives log-prob 0 off the completion), so compare on the completion.
    mask = completion[:, 1:]
    trl_grad = torch.autograd.grad(trl_loss, token_logps, retain_graph=True)[0] * mask
    grad = torch.autograd.grad(loss, token_logps)[0] * mask
    assert float((grad - trl_grad).norm()) <= tol * max(1.0, float(trl_grad.norm()))
    for key in METRICS:
        assert abs(float(metrics[key]) - trl_metrics[key]) <= tol * max(1.0, abs(trl_metrics[key])), key


def smoothing_for(loss_type):
    return {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}.get(loss_type, 0.0)


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_loss_types_match_trl(loss_type):
    for seed in range(2):
        token_logps, completion, ref = token_batch(seed, 2 * PAIRS)
        token_logps.requires_grad_(True)
        eps = smoothing_for(loss_type)
        trl_out = run_trl_dpo(dpo_trainer(loss_type, label_smoothing=eps), token_logps, completion, ref)
        ours = ours_dpo(loss_type, token_logps, completion, ref, label_smoothing=eps)
        assert_parity(trl_out, ours, token_logps, completion)


@pytest.mark.parametrize("kind,coef", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3),
                                       ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "discopop", "sigmoid_norm"])
def test_f_divergences_match_trl(kind, coef, loss_type):
    token_logps, completion, ref = token_batch(7, 2 * PAIRS)
    token_logps.requires_grad_(True)
    eps = smoothing_for(loss_type)
    trainer = dpo_trainer(loss_type, f_divergence_type=kind, f_alpha_divergence_coef=coef, label_smoothing=eps)
    ours = ours_dpo(loss_type, token_logps, completion, ref, f_divergence_type=kind, f_alpha_divergence_coef=coef,
                    label_smoothing=eps)
    assert_parity(run_trl_dpo(trainer, token_logps, completion, ref), ours, token_logps, completion)


def test_weighted_combination_matches_trl():
    token_logps, completion, ref = token_batch(8, 2 * PAIRS)
    token_logps.requires_grad_(True)
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]  # TRL's MPO example
    trl_out = run_trl_dpo(dpo_trainer(types, loss_weights=weights), token_logps, completion, ref)
    assert_parity(trl_out, ours_dpo(types, token_logps, completion, ref, loss_weights=weights), token_logps, completion)


def test_wpo_weighting_matches_trl():
    token_logps, completion, ref = token_batch(9, 2 * PAIRS)
    token_logps.requires_grad_(True)
    g = torch.Generator().manual_seed(9)
    log_sum_p2 = torch.where(completion[:, 1:], -torch.rand(2 * PAIRS, LENGTH - 1, generator=g) * 2, 0.0)
    trl_out = run_trl_dpo(dpo_trainer("sigmoid", use_weighting=True), token_logps, completion, ref, log_sum_p2)
    mask = completion[:, 1:]
    w = wpo_weights(torch.where(mask, token_logps, 0.0).sum(1), torch.where(mask, log_sum_p2, 0.0).sum(1), mask.sum(1))
    ours = ours_dpo("sigmoid", token_logps, completion, ref, pair_weights=w[:PAIRS] * w[PAIRS:])
    assert_parity(trl_out, ours, token_logps, completion)


def test_ld_dpo_matches_trl():
    token_logps, completion, ref = token_batch(10, 2 * PAIRS)
    token_logps.requires_grad_(True)
    trl_out = run_trl_dpo(dpo_trainer("sigmoid", ld_alpha=0.4), token_logps, completion, ref)
    mask = completion[:, 1:]
    wc, wr = ld_dpo_token_weights(mask[:PAIRS], mask[PAIRS:], 0.4)
    sums = (token_logps * torch.cat([wc, wr])).sum(1)
    assert_parity(trl_out, ours_dpo("sigmoid", token_logps, completion, ref, sums=sums), token_logps, completion)


def _mean_logps(seed):
    token_logps, completion, _ = token_batch(seed, 2 * PAIRS)
    mask = completion[:, 1:]
    sums = (token_logps * mask).sum(1).double().requires_grad_(True)
    return sums, mask.sum(1).double()


@pytest.mark.parametrize("loss_type,alpha", [("sigmoid", 0.0), ("simpo", 0.0), ("simpo", 0.25)])
def test_cpo_family_matches_trl(loss_type, alpha):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    trainer = object.__new__(CPOTrainer)
    trainer.__dict__.update(beta=BETA, alpha=alpha, loss_type=loss_type, simpo_gamma=0.5, label_smoothing=0.1,
                            accelerator=Accelerator())
    sums, lengths = _mean_logps(11)
    trl_input = sums / lengths if loss_type == "simpo" else sums  # TRL averages for simpo
    trl_losses, trl_chosen_rewards, _ = trainer.cpo_loss(trl_input[:PAIRS], trl_input[PAIRS:])
    ours_type = {"sigmoid": "cpo", "simpo": "alphapo" if alpha else "simpo"}[loss_type]
    losses, metrics = pairwise_loss(sums[:PAIRS], sums[PAIRS:], loss_type=ours_type, beta=BETA, label_smoothing=0.1,
                                    chosen_lengths=lengths[:PAIRS], rejected_lengths=lengths[PAIRS:], cpo_alpha=0.0,
                                    simpo_gamma=0.5, alpha=alpha)
    assert torch.allclose(losses, trl_losses, rtol=1e-10, atol=0)
    assert torch.allclose(torch.autograd.grad(losses.sum(), sums)[0],
                          torch.autograd.grad(trl_losses.sum(), sums)[0], rtol=1e-10, atol=1e-14)
    assert math.isclose(float(metrics["rewards/chosen"]), float(trl_chosen_rewards.mean()), rel_tol=1e-10)


def test_orpo_matches_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    trainer = object.__new__(ORPOTrainer)
    trainer.__dict__.update(beta=BETA, accelerator=Accelerator())
    sums, lengths = _mean_logps(12)
    means = sums / lengths
    trl_losses, _, _, trl_ratio, trl_log_odds = trainer.odds_ratio_loss(means[:PAIRS], means[PAIRS:])
    nll = -sums[:PAIRS].sum() / lengths[:PAIRS].sum()  # TRL's cross-entropy over all chosen tokens
    trl_loss = nll - trl_losses.mean()
    losses, metrics = pairwise_loss(sums[:PAIRS], sums[PAIRS:], loss_type="orpo", beta=BETA,
                                    chosen_lengths=lengths[:PAIRS], rejected_lengths=lengths[PAIRS:])
    # TRL evaluates the odds ratio in fp32 whatever the input dtype.
    assert math.isclose(float(losses.mean()), float(trl_loss), rel_tol=1e-6)
    grad, trl_grad = (torch.autograd.grad(x, sums)[0] for x in (losses.mean(), trl_loss))
    assert float((grad - trl_grad).norm()) <= 1e-6 * float(trl_grad.norm())
    assert math.isclose(float(metrics["log_odds_ratio"]), float(trl_ratio), rel_tol=1e-6)
    assert math.isclose(float(metrics["log_odds_chosen"]), float(trl_log_odds), rel_tol=1e-6)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_trl(loss_type):
    rows = 2 * PAIRS
    token_logps, completion, ref = token_batch(13, rows)
    kl_token_logps, kl_completion, kl_ref = token_batch(14, rows)
    token_logps.requires_grad_(True)
    labels = torch.tensor([True, False] * PAIRS)
    labels[2] = True
    input_ids, kl_ids = torch.zeros(rows, LENGTH, dtype=torch.long), torch.ones(rows, LENGTH, dtype=torch.long)
    trainer = object.__new__(KTOTrainer)
    trainer.__dict__.update(beta=BETA, loss_type=loss_type, desirable_weight=1.3, undesirable_weight=0.8,
                            calculate_KL=loss_type == "kto", precompute_ref_logps=True, aux_loss_enabled=False,
                            accelerator=Accelerator(), _metrics={"train": defaultdict(list)},
                            _total_train_tokens=0, _tp_size=1,
                            model=FakeLMHead({id(input_ids): head_output(token_logps),
                                              id(kl_ids): head_output(kl_token_logps)}))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "completion_mask": completion.long(), "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
             "KL_completion_mask": kl_completion.long(), "label": labels, "ref_logps": ref, "ref_KL_logps": kl_ref}
    trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    sums = (token_logps * completion[:, 1:]).sum(1)
    kl = kto_kl_estimate((kl_token_logps * kl_completion[:, 1:]).sum(1), kl_ref) if loss_type == "kto" else None
    losses, metrics = kto_loss(sums, ref, labels, beta=BETA, kl=kl, desirable_weight=1.3, undesirable_weight=0.8,
                               loss_type=loss_type)
    loss = losses.mean()
    assert abs(float(loss - trl_loss)) <= 1e-6
    grads = [torch.autograd.grad(x, token_logps, retain_graph=True)[0] * completion[:, 1:] for x in (loss, trl_loss)]
    assert float((grads[0] - grads[1]).norm()) <= 1e-6 * max(1.0, float(grads[1].norm()))
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert abs(float(metrics[key]) - trl_metrics[key]) <= 1e-5 * max(1.0, abs(trl_metrics[key])), key
