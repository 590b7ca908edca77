"""UnpairedLoss (KTO, BCO; fused, lean and budget) against the float64 reference pipeline:
materialised logits -> per-completion sums -> the same kto_loss / BCOLoss."""
import pytest
import torch

import prefops
from conftest import assert_fused_loss_matches, relative_error
from prefops.losses import BCOLoss, kto_kl_estimate, kto_loss
from prefops.unpaired import UnpairedLoss
from prefops.chunks import budget_bytes_per_logit

COMPLETIONS, LENGTH, HIDDEN, VOCAB = 5, 9, 19, 263
BETA = 0.2


def make_batch(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(COMPLETIONS, LENGTH, HIDDEN, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) * 4 / HIDDEN**0.5).to(dtype)
    targets = torch.randint(0, VOCAB, (COMPLETIONS, LENGTH), generator=g)
    targets[:, :2] = -100
    targets[1, -3:] = -100
    labels = torch.tensor([True, False, True, True, False])
    ref = torch.randn(COMPLETIONS, generator=g, dtype=torch.float64) * 3 - 45
    return hidden, weight, targets, labels, ref


def reference_sums(hidden, weight, targets):
    return prefops.reference.linear_logprobs(hidden.double(), weight.double(), targets).sum(1)


@pytest.mark.parametrize("strategy", ["lean", "budget"])
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kto_matches_reference(loss_type, strategy, dtype):
    hidden, weight, targets, labels, ref = make_batch(dtype)
    ref = ref.float()  # both sides read the same fp32 reference log-probs
    module = UnpairedLoss(loss_type, beta=BETA, desirable_weight=1.3, undesirable_weight=0.7, strategy=strategy,
                          budget=2 * LENGTH * VOCAB * budget_bytes_per_logit(dtype))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = module(h, w, targets, labels=labels, ref_logps=ref, kl=0.4)
    loss.backward()

    def reference(hid, wt):
        losses, expected_metrics = kto_loss(reference_sums(hid, wt, targets), ref.double(), labels, beta=BETA, kl=0.4,
                                            desirable_weight=1.3, undesirable_weight=0.7, loss_type=loss_type)
        return losses.mean(), expected_metrics

    expected_metrics, values = assert_fused_loss_matches(loss, metrics, (h.grad, w.grad), reference, hidden, weight,
                                                         dtype, ("logps/chosen", "logps/rejected"))
    # A reward is β (log-prob sum - reference), a difference of larger terms: its error is the sum's.
    for name in ("chosen", "rejected"):
        terms = BETA * (expected_metrics[f"logps/{name}"].abs() + ref.double().abs().mean())
        assert relative_error(metrics[f"rewards/{name}"], expected_metrics[f"rewards/{name}"], terms) <= values, name
    counted = targets != -100
    assert int(metrics["num_tokens/chosen"]) == int(counted[labels].sum())


def test_kto_reference_point_from_mismatched_pairs():
    hidden, weight, targets, labels, ref = make_batch()
    kl_hidden = torch.roll(hidden, 1, dims=0)  # each completion after another prompt
    # Seeded so the estimate is positive and the clamp at 0 does not hide the value.
    noise = torch.randn(kl_hidden.shape, generator=torch.Generator().manual_seed(1))
    ref_kl_hidden = kl_hidden + 0.3 * noise
    module = UnpairedLoss("kto", beta=BETA)
    loss, metrics = module(hidden, weight, targets, labels=labels, ref_logps=ref.float(), kl_hidden=kl_hidden,
                           kl_targets=targets, ref_kl_hidden=ref_kl_hidden, ref_weight=weight)
    kl = kto_kl_estimate(reference_sums(kl_hidden, weight, targets), reference_sums(ref_kl_hidden, weight, targets))
    assert float(kl) > 0  # the test would not see a clamp otherwise
    assert abs(float(metrics["kl"]) - float(kl)) <= 1e-5 * float(kl)
    expected, _ = kto_loss(reference_sums(hidden, weight, targets), ref, labels, beta=BETA, kl=kl)
    assert relative_error(loss, expected.mean()) <= 1e-5


@pytest.mark.parametrize("strategy", ["lean", "budget"])
def test_bco_matches_reference_and_keeps_running_mean(strategy):
    module = UnpairedLoss("bco", beta=BETA, strategy=strategy)
    expected_module = BCOLoss(beta=BETA)
    for seed in range(2):
        hidden, weight, targets, labels, ref = make_batch(seed=seed)
        h = hidden.clone().requires_grad_()
        if strategy == "budget":
            with pytest.warns(UserWarning, match="running mean"):
                loss, metrics = module(h, weight, targets, labels=labels, ref_logps=ref.float())
        else:
            loss, metrics = module(h, weight, targets, labels=labels, ref_logps=ref.float())
        loss.backward()
        h64 = hidden.double().requires_grad_()
        losses, expected_metrics = expected_module(reference_sums(h64, weight, targets), ref, labels)
        losses.mean().backward()
        assert relative_error(loss, losses.mean()) <= 1e-5
        assert relative_error(h.grad, h64.grad) <= 1e-5
        assert abs(float(metrics["delta"]) - float(expected_metrics["delta"])) <= 1e-6
    assert abs(float(module.bco.delta) - float(expected_module.delta)) <= 1e-6


def test_reference_hidden_equals_precomputed_and_packed_equals_padded():
    hidden, weight, targets, labels, _ = make_batch()
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    ref = prefops.sequence_sum(prefops.linear_logprobs(ref_hidden, weight, targets), targets != -100)
    module = UnpairedLoss("kto", beta=BETA)
    padded, _ = module(hidden, weight, targets, labels=labels, ref_hidden=ref_hidden, ref_weight=weight, kl=0.1)
    precomputed, _ = module(hidden, weight, targets, labels=labels, ref_logps=ref, kl=0.1)
    seq_ids = torch.arange(COMPLETIONS)[:, None].expand(-1, LENGTH).reshape(-1)
    packed, _ = module(hidden.reshape(-1, HIDDEN), weight, targets.reshape(-1), labels=labels, seq_ids=seq_ids,
                       ref_logps=ref, kl=0.1)
    assert relative_error(padded, precomputed) <= 1e-6
    assert relative_error(packed, padded) <= 1e-6


def test_bad_input():
    hidden, weight, targets, labels, ref = make_batch()
    with pytest.raises(ValueError, match="valid: 'kto', 'apo_zero_unpaired', 'bco'"):
        UnpairedLoss("kto_pair")
    module = UnpairedLoss("kto")
    with pytest.raises(ValueError, match="labels must have shape"):
        module(hidden, weight, targets, labels=labels[:2], ref_logps=ref, kl=0.0)
    with pytest.raises(ValueError, match="needs its reference point"):
        module(hidden, weight, targets, labels=labels, ref_logps=ref)
    with pytest.raises(ValueError, match="needs the reference"):
        module(hidden, weight, targets, labels=labels, kl=0.0)
    with pytest.raises(ValueError, match="ref_logps must have shape"):
        module(hidden, weight, targets, labels=labels, ref_logps=ref[:2], kl=0.0)
    with pytest.raises(ValueError, match="kl_hidden needs the reference side"):
        module(hidden, weight, targets, labels=labels, ref_logps=ref, kl_hidden=hidden, kl_targets=targets)
    with pytest.raises(TypeError, match="labels must be a bool tensor"):
        module(hidden, weight, targets, labels=labels.long(), ref_logps=ref, kl=0.0)


def _sums64(hidden, weight, targets, token_weights):
    """float64 Σ_t w_t log p(y_t) per row, from materialised logits."""
    logp = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    counted = targets != -100
    token = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return torch.where(counted, token * token_weights.double(), 0.0).sum(1)


def _kto64(policy, ref, labels, kl, beta=BETA):
    """KTO (arXiv:2402.01306, Eq. 7) with λ_D = λ_U = 1: 1 - σ(±β (Δ - z_0))."""
    shifted = beta * (policy - ref - kl)
    return torch.where(labels, 1 - torch.sigmoid(shifted), 1 - torch.sigmoid(-shifted)).mean()


@pytest.mark.parametrize("strategy", ["lean", "budget"])
def test_kto_token_weights_match_float64(strategy):
    """Length-normalised KTO: weights 1/n_i on completion i's tokens (times a random factor, so a weight
    that is dropped or applied twice shows), on the policy, the reference from ref_hidden and the
    reference point from kl_hidden (kl_token_weights)."""
    hidden, weight, targets, labels, _ = make_batch()
    g = torch.Generator().manual_seed(3)
    counted = (targets != -100).double()
    token_weights = (0.5 + torch.rand(targets.shape, generator=g, dtype=torch.float64)) / counted.sum(1, keepdim=True)
    ref_hidden = hidden + 0.2 * torch.randn(hidden.shape, generator=g)
    kl_hidden, kl_targets = torch.roll(hidden, 1, dims=0), torch.roll(targets, 2, dims=0)
    ref_kl_hidden = kl_hidden + 0.2 * torch.randn(hidden.shape, generator=g)
    kl_weights = torch.roll(token_weights, 2, dims=0) * 1.5
    module = UnpairedLoss("kto", beta=BETA, strategy=strategy, budget=2 * LENGTH * VOCAB * 4)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = module(h, w, targets, labels=labels, token_weights=token_weights.float(), ref_hidden=ref_hidden,
                           ref_weight=weight, kl_hidden=kl_hidden, kl_targets=kl_targets, ref_kl_hidden=ref_kl_hidden,
                           kl_token_weights=kl_weights.float())
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    policy = _sums64(h64, w64, targets, token_weights)
    ref = _sums64(ref_hidden, weight, targets, token_weights)
    kl = (_sums64(kl_hidden, weight, kl_targets, kl_weights) - _sums64(ref_kl_hidden, weight, kl_targets,
                                                                         kl_weights)).mean().clamp(min=0)
    assert float(kl) > 0  # else the clamp would hide a wrong estimate
    expected = _kto64(policy, ref, labels, kl)
    expected.backward()
    assert abs(float(metrics["kl"]) - float(kl)) <= 1e-5 * float(kl)
    assert relative_error(loss, expected) <= 1e-5
    assert relative_error(h.grad, h64.grad) <= 1e-5
    assert relative_error(w.grad, w64.grad) <= 1e-5
    assert relative_error(metrics["logps/chosen"], policy[labels].mean()) <= 1e-5


def test_given_kto_reference_point_is_used_as_given():
    """A kl the caller gives is the reference point, a negative one too (no clamp); the clamp at 0
    belongs to the estimate from mismatched pairs."""
    hidden, weight, targets, labels, ref = make_batch()
    h = hidden.clone().requires_grad_()
    loss, metrics = UnpairedLoss("kto", beta=BETA)(h, weight, targets, labels=labels, ref_logps=ref.float(), kl=-0.7)
    loss.backward()
    h64 = hidden.double().requires_grad_()
    expected = _kto64(_sums64(h64, weight, targets, torch.ones(targets.shape)), ref, labels, -0.7)
    expected.backward()
    assert float(metrics["kl"]) == pytest.approx(-0.7)
    assert relative_error(loss, expected) <= 1e-5
    assert relative_error(h.grad, h64.grad) <= 1e-5


def test_token_weights_bad_input():
    hidden, weight, targets, labels, ref = make_batch()
    module = UnpairedLoss("kto")
    with pytest.raises(ValueError, match=r"token_weights must be a tensor of the shape of targets \(5, 9\)"):
        module(hidden, weight, targets, labels=labels, ref_logps=ref, kl=0.0, token_weights=torch.ones(5, 8))
    with pytest.raises(ValueError, match=r"kl_token_weights must be a tensor of the shape of targets \(5, 9\)"):
        module(hidden, weight, targets, labels=labels, ref_logps=ref, kl_hidden=hidden, kl_targets=targets,
               ref_kl_logps=ref, kl_token_weights=torch.ones(9))
    with pytest.raises(ValueError, match="kl_token_weights weigh kl_targets: pass them with kl_hidden"):
        module(hidden, weight, targets, labels=labels, ref_logps=ref, kl=0.0, kl_token_weights=torch.ones(5, 9))
    with pytest.raises(ValueError, match="kl must be finite"):
        module(hidden, weight, targets, labels=labels, ref_logps=ref, kl=float("nan"))
