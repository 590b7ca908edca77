"""TDPO and token-weighted (TGDPO) losses: the pure functions against plain float64 formulas, and
PreferenceLoss (fused) against the float64 pipeline on materialised logits."""
import pytest
import torch

import prefops
from conftest import grad_tolerance, loss_reference64, relative_error, value_tolerance
from helpers import kl64, token_values64
from prefops.losses import pairwise_loss
from prefops.losses.token_level import tdpo_loss, tgdpo_loss, tgdpo_token_rewards, tgdpo_token_weights

PAIRS, LENGTH, HIDDEN, REF_HIDDEN, VOCAB = 3, 9, 21, 17, 211
BETA, ALPHA = 0.3, 0.7


def ls(x):
    return torch.log(torch.sigmoid(x))


def sequence_batch(seed):
    g = torch.Generator().manual_seed(seed)
    values = {k: -torch.rand(PAIRS, generator=g, dtype=torch.float64) * 20 for k in ("cw", "cl", "rw", "rl")}
    values.update(kw=torch.rand(PAIRS, generator=g, dtype=torch.float64) * 5,
                  kl=torch.rand(PAIRS, generator=g, dtype=torch.float64) * 5)
    return values


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo_matches_the_formula_and_pairwise_loss(variant):
    b = {k: v.clone().requires_grad_() for k, v in sequence_batch(1).items()}
    dw, dl = b["cw"] - b["rw"], b["cl"] - b["rl"]
    if variant == "tdpo1":
        want = -ls(BETA * ((dw - dl) - (b["kl"] - b["kw"])))
    else:
        want = -ls(BETA * ((dw - dl) - ALPHA * (b["kl"] - b["kw"].detach())))
    got = tdpo_loss(dw, dl, b["kw"], b["kl"], beta=BETA, alpha=ALPHA, variant=variant)
    assert relative_error(got, want) <= 1e-12
    losses, metrics = pairwise_loss(b["cw"], b["cl"], b["rw"], b["rl"], loss_type=variant, beta=BETA,
                                    chosen_seq_kl=b["kw"], rejected_seq_kl=b["kl"], tdpo_alpha=ALPHA)
    assert relative_error(losses, want) <= 1e-12
    grads = torch.autograd.grad(losses.sum(), [b["kw"], b["kl"]], allow_unused=True, materialize_grads=True)
    want_grads = torch.autograd.grad(want.sum(), [b["kw"], b["kl"]], allow_unused=True)
    if variant == "tdpo2":  # the chosen KL is stop-gradient in TDPO2
        assert want_grads[0] is None and float(grads[0].abs().max()) == 0.0
    else:
        assert relative_error(grads[0], want_grads[0]) <= 1e-12
    assert relative_error(grads[1], want_grads[1]) <= 1e-12
    assert relative_error(metrics["rewards/chosen"], (BETA * (dw + b["kw"])).mean()) <= 1e-12
    assert relative_error(metrics["rewards/rejected"], (BETA * (dl + b["kl"])).mean()) <= 1e-12
    assert relative_error(metrics["kl/chosen"], b["kw"].mean()) <= 1e-12


def test_tdpo_variants_and_alpha_differ():
    b = sequence_batch(2)
    dw, dl = b["cw"] - b["rw"], b["cl"] - b["rl"]
    one = tdpo_loss(dw, dl, b["kw"], b["kl"], beta=BETA, variant="tdpo1")
    two = tdpo_loss(dw, dl, b["kw"], b["kl"], beta=BETA, alpha=0.5, variant="tdpo2")
    assert not torch.allclose(one, two)
    assert torch.allclose(tdpo_loss(dw, dl, b["kw"], b["kl"], beta=BETA, alpha=0.0, variant="tdpo2"),
                          -ls(BETA * (dw - dl)))


def test_tgdpo_formula():
    g = torch.Generator().manual_seed(3)
    delta_w, delta_l, r_w, r_l = (torch.randn(PAIRS, LENGTH, generator=g, dtype=torch.float64) for _ in range(4))
    want = -ls((BETA * (1 + ALPHA * BETA * r_w) * delta_w).sum(1) - (BETA * (1 - ALPHA * BETA * r_l) * delta_l).sum(1))
    assert relative_error(tgdpo_loss(delta_w, delta_l, r_w, r_l, beta=BETA, alpha=ALPHA), want) <= 1e-12
    u_w, u_l = tgdpo_token_weights(r_w, r_l, beta=BETA, alpha=ALPHA)
    assert torch.allclose(u_w, 1 + ALPHA * BETA * r_w) and torch.allclose(u_l, 1 - ALPHA * BETA * r_l)
    mask = torch.rand(PAIRS, LENGTH, generator=g) > 0.3
    rewards = tgdpo_token_rewards(r_w, r_l, mask)
    assert torch.equal(rewards, torch.where(mask, r_w - r_l, 0.0))


def test_missing_or_bad_token_level_inputs_are_named():
    b = sequence_batch(4)
    with pytest.raises(ValueError, match="'tdpo2' needs chosen_seq_kl"):
        pairwise_loss(b["cw"], b["cl"], b["rw"], b["rl"], loss_type="tdpo2")
    with pytest.raises(ValueError, match="rejected_seq_kl must have the shape"):
        pairwise_loss(b["cw"], b["cl"], b["rw"], b["rl"], loss_type="tdpo1", chosen_seq_kl=b["kw"],
                      rejected_seq_kl=b["kl"][:-1])
    with pytest.raises(ValueError, match="tdpo_alpha must lie in"):
        pairwise_loss(b["cw"], b["cl"], b["rw"], b["rl"], loss_type="tdpo2", chosen_seq_kl=b["kw"],
                      rejected_seq_kl=b["kl"], tdpo_alpha=-1.0)
    with pytest.raises(ValueError, match="variant must be one of"):
        tdpo_loss(b["cw"], b["cl"], b["kw"], b["kl"], beta=BETA, variant="tdpo3")
    with pytest.raises(ValueError, match="valid: .*tdpo1, tdpo2"):
        pairwise_loss(b["cw"], b["cl"], b["rw"], b["rl"], loss_type="tdpo")


# ---- fused, from hidden states ------------------------------------------------------------------------------


def model_batch(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)  # noqa: E731
    batch = {
        "hidden": rand(2 * PAIRS, LENGTH, HIDDEN), "weight": rand(VOCAB, HIDDEN, scale=4 / HIDDEN**0.5),
        "ref_hidden": rand(2 * PAIRS, LENGTH, REF_HIDDEN), "ref_weight": rand(VOCAB, REF_HIDDEN, scale=4 / REF_HIDDEN**0.5),
        "rm_hidden": rand(2 * PAIRS, LENGTH, HIDDEN), "rm_weight": rand(VOCAB, HIDDEN, scale=4 / HIDDEN**0.5),
    }
    batch = {k: v.to(dtype) for k, v in batch.items()}
    targets = torch.randint(0, VOCAB, (2 * PAIRS, LENGTH), generator=g)
    targets[:, :2] = -100
    for row in range(2 * PAIRS):
        targets[row, LENGTH - int(torch.randint(0, 3, (), generator=g)):] = -100
    batch["targets"] = targets
    return batch


def reference_tdpo(batch, loss_type, direction, z, y):
    """Float64 pipeline on the policy's and the reference's logits z, y [2P, T, V]: per-token KL and
    log-probs -> sums -> the TDPO formula. Returns the loss and (the chosen reward, its terms' size)."""
    targets = batch["targets"]
    counted = targets != -100
    kl = torch.where(counted, kl64(y, z) if direction == "ref_policy" else kl64(z, y), 0.0)
    logp, ref_logp = (token_values64(x.reshape(-1, VOCAB), targets.reshape(-1))[0].view(targets.shape) for x in (z, y))
    sums = lambda x: x.sum(1).view(2, PAIRS)  # noqa: E731
    (cw, cl), (rw, rl), (kw, kl_) = sums(logp), sums(ref_logp), sums(kl)
    dw, dl = cw - rw, cl - rl
    if loss_type == "tdpo1":
        loss = -ls(BETA * ((dw - dl) - (kl_ - kw)))
    else:
        loss = -ls(BETA * ((dw - dl) - ALPHA * (kl_ - kw.detach())))
    reward_terms = (BETA * (cw.abs() + rw.abs() + kw.abs())).mean()
    return loss.mean(), ((BETA * (dw + kw)).mean(), reward_terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type,direction,backend", [("tdpo2", "ref_policy", "torch"),
                                                          ("tdpo1", "policy_ref", "torch"),
                                                          ("tdpo2", "ref_policy", "triton")])
def test_fused_tdpo_matches_float64_pipeline(dtype, loss_type, direction, backend):
    batch = model_batch(dtype)
    module = prefops.PreferenceLoss(loss_type, beta=BETA, tdpo_alpha=ALPHA, kl_direction=direction)
    h, w = batch["hidden"].clone().requires_grad_(), batch["weight"].clone().requires_grad_()
    with prefops.settings(backend=backend, workspace=40_000):
        loss, metrics = module(h, w, batch["targets"], ref_hidden=batch["ref_hidden"], ref_weight=batch["ref_weight"])
        loss.backward()
    z, y = (batch[hid].double() @ batch[wt].double().t() for hid, wt in (("hidden", "weight"),
                                                                        ("ref_hidden", "ref_weight")))
    expected, (reward, reward_terms), grads, sizes, logit_size, loss_scale = loss_reference64(
        lambda hid, wt: reference_tdpo(batch, loss_type, direction, hid @ wt.t(), y), batch["hidden"], batch["weight"])
    # The reference model's logits err as the policy's: the loss's terms through them count too.
    ref_scale = loss_reference64(lambda hid, wt: reference_tdpo(batch, loss_type, direction, z, hid @ wt.t()),
                                 batch["ref_hidden"], batch["ref_weight"])[-1]
    # Both models' logits in fp32 from the rounded inputs: the loss and the sums carry only fp32
    # error; the gradients, stored in the inputs' dtype, carry its rounding.
    tokens = batch["targets"].numel()
    values = value_tolerance(HIDDEN, REF_HIDDEN, VOCAB, tokens)
    assert relative_error(loss, expected, scale=torch.cat([loss_scale, ref_scale])) <= values
    limit = grad_tolerance(dtype, HIDDEN, VOCAB, tokens, logit_size)
    for name, grad, want, size in zip(("hidden", "weight"), (h.grad, w.grad), grads, sizes):
        assert relative_error(grad, want, scale=size) <= limit, f"grad of {name}"
    # The reward is a difference of larger log-prob sums: its error is the sums'.
    assert relative_error(metrics["rewards/chosen"], reward, scale=reward_terms) <= values
    assert float(metrics["num_tokens/chosen"]) == float((batch["targets"][:PAIRS] != -100).sum())


def test_fused_tdpo_packed_layout_equals_padded():
    batch = model_batch()
    module = prefops.PreferenceLoss("tdpo2", beta=BETA)
    padded, _ = module(batch["hidden"], batch["weight"], batch["targets"], ref_hidden=batch["ref_hidden"],
                       ref_weight=batch["ref_weight"])
    keep = (batch["targets"] != -100).reshape(-1)
    seq_ids = torch.arange(2 * PAIRS).repeat_interleave(LENGTH)[keep]
    flat = lambda x: x.reshape(-1, x.shape[-1])[keep]  # noqa: E731
    packed, _ = module(flat(batch["hidden"]), batch["weight"], batch["targets"].reshape(-1)[keep], seq_ids=seq_ids,
                       ref_hidden=flat(batch["ref_hidden"]), ref_weight=batch["ref_weight"])
    assert torch.allclose(padded, packed, rtol=1e-6)


def reference_weighted_dpo(batch, token_weights):
    h = batch["hidden"].double().requires_grad_()
    w = batch["weight"].double().requires_grad_()
    logp = prefops.reference.linear_logprobs(h, w, batch["targets"])
    ref_logp = prefops.reference.linear_logprobs(batch["ref_hidden"].double(), batch["ref_weight"].double(),
                                                 batch["targets"])
    delta = ((logp - ref_logp) * token_weights.double()).sum(1)
    loss = -ls(BETA * (delta[:PAIRS] - delta[PAIRS:])).mean()
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("strategy", ["lean", "budget"])
def test_user_token_weights(strategy):
    batch = model_batch()
    weights = torch.rand(2 * PAIRS, LENGTH, dtype=torch.float64) * (batch["targets"] != -100)
    module = prefops.PreferenceLoss("sigmoid", beta=BETA, strategy=strategy, budget=2 * LENGTH * VOCAB * 4)
    h, w = batch["hidden"].clone().requires_grad_(), batch["weight"].clone().requires_grad_()
    loss, _ = module(h, w, batch["targets"], ref_hidden=batch["ref_hidden"], ref_weight=batch["ref_weight"],
                     token_weights=weights.float())
    loss.backward()
    expected, grad_h, grad_w = reference_weighted_dpo(batch, weights)
    assert relative_error(loss, expected) <= 1e-5
    assert relative_error(h.grad, grad_h) <= 1e-5 and relative_error(w.grad, grad_w) <= 1e-5


def test_fused_tgdpo_matches_float64_formula():
    batch = model_batch(seed=5)
    counted = batch["targets"] != -100
    module = prefops.PreferenceLoss("sigmoid", beta=BETA, tgdpo_alpha=ALPHA)
    h, w = batch["hidden"].clone().requires_grad_(), batch["weight"].clone().requires_grad_()
    loss, _ = module(h, w, batch["targets"], ref_hidden=batch["ref_hidden"], ref_weight=batch["ref_weight"],
                     rm_hidden=batch["rm_hidden"], rm_weight=batch["rm_weight"])
    loss.backward()

    h64, w64 = batch["hidden"].double().requires_grad_(), batch["weight"].double().requires_grad_()
    logps = lambda hid, wt: prefops.reference.linear_logprobs(hid.double(), wt.double(), batch["targets"])  # noqa: E731
    ref_logp = logps(batch["ref_hidden"], batch["ref_weight"])
    rewards = torch.where(counted, logps(batch["rm_hidden"], batch["rm_weight"]) - ref_logp, 0.0)
    delta = logps(h64, w64) - ref_logp
    expected = tgdpo_loss(delta[:PAIRS], delta[PAIRS:], rewards[:PAIRS], rewards[PAIRS:], beta=BETA,
                          alpha=ALPHA).mean()
    expected.backward()
    assert relative_error(loss, expected) <= 1e-5
    assert relative_error(h.grad, h64.grad) <= 1e-5 and relative_error(w.grad, w64.grad) <= 1e-5
    # Precomputed token rewards give the same loss; α = 0 gives plain DPO.
    again, _ = module(batch["hidden"], batch["weight"], batch["targets"], ref_hidden=batch["ref_hidden"],
                      ref_weight=batch["ref_weight"], token_rewards=rewards.float())
    assert torch.allclose(again, loss.detach(), rtol=1e-5)
    dpo, _ = prefops.PreferenceLoss("sigmoid", beta=BETA)(batch["hidden"], batch["weight"], batch["targets"],
                                                         ref_hidden=batch["ref_hidden"], ref_weight=batch["ref_weight"])
    assert not torch.allclose(dpo, loss.detach(), rtol=1e-3)


def test_preference_loss_bad_input_is_named():
    batch = model_batch()
    args = (batch["hidden"], batch["weight"], batch["targets"])
    ref = dict(ref_hidden=batch["ref_hidden"], ref_weight=batch["ref_weight"])
    with pytest.raises(ValueError, match="'tdpo2' needs ref_hidden and ref_weight"):
        prefops.PreferenceLoss("tdpo2")(*args, ref_chosen_logps=torch.zeros(PAIRS), ref_rejected_logps=torch.zeros(PAIRS))
    with pytest.raises(ValueError, match="vocabularies differ"):
        prefops.PreferenceLoss("tdpo1")(*args, ref_hidden=batch["ref_hidden"], ref_weight=batch["ref_weight"][:-1])
    with pytest.raises(ValueError, match="tgdpo_alpha needs token_rewards"):
        prefops.PreferenceLoss("sigmoid", tgdpo_alpha=0.5)(*args, **ref)
    with pytest.raises(ValueError, match="set tgdpo_alpha"):
        prefops.PreferenceLoss("sigmoid")(*args, **ref, token_rewards=torch.zeros(2 * PAIRS, LENGTH))
    with pytest.raises(ValueError, match="token_rewards must have the shape of targets"):
        prefops.PreferenceLoss("sigmoid", tgdpo_alpha=0.5)(*args, **ref, token_rewards=torch.zeros(PAIRS, LENGTH))
    with pytest.raises(ValueError, match="token_weights must be a tensor of the shape of targets"):
        prefops.PreferenceLoss("sigmoid")(*args, **ref, token_weights=torch.ones(LENGTH))
    with pytest.warns(UserWarning, match="does not fit the memory budget"):
        prefops.PreferenceLoss("tdpo2", strategy="budget", budget=1024)(*args, **ref)
