"""Pairwise preference losses against plain float64 formulas written from the papers."""
import math

import pytest
import torch

import prefops
from prefops.losses import LOSSES, diffusion_dpo_loss, ld_dpo_token_weights, mapo_loss, pairwise_loss, wpo_weights
from prefops.reference import linear_logprobs, token_sum_p2

P = 16
BETA = 0.2
PARAMS = {"discopop_tau": 0.05, "simpo_gamma": 0.3, "cpo_alpha": 0.7, "alpha": 0.3, "dpop_lambda": 5.0}


def ls(x):
    """log σ(x), written plainly: fine in float64 at the magnitudes used here."""
    return torch.log(torch.sigmoid(x))


def nll(b):
    return -b["cw"] / b["nw"].mean()


def mean_logps(b):
    return b["cw"] / b["nw"], b["cl"] / b["nl"]


def alpha_reward(x, alpha):
    return (1 - torch.exp(x) ** (-alpha)) / alpha


def log_odds(b):
    mw, ml = mean_logps(b)
    return (mw - ml) - (torch.log(1 - torch.exp(mw)) - torch.log(1 - torch.exp(ml)))


def f_scores(u_log, kind, coef=0.5):
    """f'(u) of the f-DPO paper (arXiv:2309.16240), Table 1, with u = π/π_ref."""
    u = torch.exp(u_log)
    if kind == "reverse_kl":
        return u_log
    if kind == "forward_kl":
        return 1 - 1 / u
    if kind == "js_divergence":
        return torch.log(2 * u / (1 + u))
    return (u ** (coef - 1) - 1) / (coef - 1)


def expected(loss_type, b, eps=0.0, f="reverse_kl", coef=0.5, probs=None):
    """Per-pair loss in float64, written independently of prefops.losses."""
    beta = BETA
    dw, dl = b["cw"] - b["rw"], b["cl"] - b["rl"]
    sw, sl = f_scores(dw, f, coef), f_scores(dl, f, coef)
    d = sw - sl
    mw, ml = mean_logps(b)
    if loss_type == "sigmoid":
        e = eps if probs is None else 1 - probs
        return -(1 - e) * ls(beta * d) - e * ls(-beta * d)
    if loss_type == "hinge":
        return torch.clamp(1 - beta * d, min=0)
    if loss_type == "ipo":
        return (sw / b["nw"] - sl / b["nl"] - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        q = torch.sigmoid(beta * d)
        return q * (torch.log(q) - math.log(1 - eps)) + (1 - q) * (torch.log(1 - q) - math.log(eps))
    if loss_type == "nca_pair":
        return -ls(beta * dw) - 0.5 * ls(-beta * dw) - 0.5 * ls(-beta * dl)
    if loss_type == "robust":
        return ((1 - eps) * -ls(beta * d) - eps * -ls(-beta * d)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -ls(beta * dw) - ls(-beta * dl)
    if loss_type == "sppo_hard":
        return (dw - 1 / (2 * beta)) ** 2 + (dl + 1 / (2 * beta)) ** 2
    if loss_type == "sppo":
        return (dw - (probs - 0.5) / beta) ** 2 + (dl - ((1 - probs) - 0.5) / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            x = torch.sort(b["cw"] - b["cl"]).values - torch.sort(b["rw"] - b["rl"]).values
        else:
            x = torch.sort(dw).values - torch.sort(dl).values
        return -(1 - eps) * ls(beta * x) - eps * ls(-beta * x)
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * dw)) + torch.sigmoid(beta * dl)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * dw) + (1 - torch.sigmoid(beta * (dw - dl)))
    if loss_type == "discopop":
        x, tau = beta * d, PARAMS["discopop_tau"]
        m = torch.sigmoid(x / tau)
        return (1 - m) * -ls(x) + m * torch.exp(-x)
    if loss_type == "sft":
        return nll(b)
    if loss_type == "sigmoid_norm":
        return -ls(beta * (sw / b["nw"] - sl / b["nl"]))
    if loss_type == "dpop":
        return -ls(beta * (dw - dl - PARAMS["dpop_lambda"] * torch.relu(b["rw"] - b["cw"])))
    if loss_type == "modpo":
        w0, w1, w2 = b["modpo_weights"]
        margin = w1 * (b["mw"][:, 0] - b["ml"][:, 0]) + w2 * (b["mw"][:, 1] - b["ml"][:, 1])
        return -ls((beta * (dw - dl) - margin) / w0)
    if loss_type == "simpo":
        x = beta * (mw - ml) - PARAMS["simpo_gamma"]
        return -(1 - eps) * ls(x) - eps * ls(-x)
    if loss_type == "alphapo":
        a = PARAMS["alpha"]
        x = beta * (alpha_reward(mw, a) - alpha_reward(ml, a)) - PARAMS["simpo_gamma"]
        return -(1 - eps) * ls(x) - eps * ls(-x)
    if loss_type == "cpo":
        x = beta * (b["cw"] - b["cl"])
        return -(1 - eps) * ls(x) - eps * ls(-x) + PARAMS["cpo_alpha"] * nll(b)
    if loss_type == "orpo":
        return nll(b) - beta * ls(log_odds(b))
    raise AssertionError(loss_type)


def make_batch(seed, dtype=torch.float32, pairs=P):
    """Sequence sums of plausible size: lengths 1..12, per-token log-probs around -1.5."""
    g = torch.Generator().manual_seed(seed)
    nw = torch.randint(1, 13, (pairs,), generator=g)
    nl = torch.randint(1, 13, (pairs,), generator=g)

    def sums(n, spread):
        per_token = torch.rand(pairs, generator=g) * 2 + 0.5
        return (-per_token * n + spread * torch.randn(pairs, generator=g)).clamp(max=-0.05)

    cw, cl = sums(nw, 1.0), sums(nl, 1.0)
    rw, rl = cw + torch.randn(pairs, generator=g), cl + torch.randn(pairs, generator=g)
    batch = {"cw": cw, "cl": cl, "rw": rw, "rl": rl, "nw": nw.to(dtype), "nl": nl.to(dtype),
             "mw": torch.randn(pairs, 2, generator=g), "ml": torch.randn(pairs, 2, generator=g),
             "modpo_weights": [0.6, 0.3, 0.1], "probs": torch.rand(pairs, generator=g)}
    for k in ("cw", "cl", "rw", "rl"):
        batch[k] = batch[k].to(dtype)
    return batch


def call(loss_type, b, **kw):
    extra = dict(PARAMS)
    if loss_type == "modpo":
        extra.update(chosen_margin_rewards=b["mw"], rejected_margin_rewards=b["ml"], modpo_weights=b["modpo_weights"])
    if loss_type == "sppo":
        extra["preference_probs"] = b["probs"]
    extra.update(kw)
    return pairwise_loss(b["cw"], b["cl"], b["rw"], b["rl"], loss_type=loss_type, beta=BETA,
                         chosen_lengths=b["nw"], rejected_lengths=b["nl"], **extra)


def rel_err(actual, want):
    actual, want = actual.detach().double(), want.detach().double()
    assert torch.isfinite(actual).all() and torch.isfinite(want).all()
    return float((actual - want).norm() / want.norm().clamp_min(1e-30))


REF_KEYS = ("eps", "f", "coef", "probs")


def check_against_float64(loss_type, b, tol, seed, **kw):
    """Values and gradients of Σ_i c_i loss_i (random c_i, so every per-pair gradient counts).

    kw holds pairwise_loss arguments plus the matching `expected` ones (REF_KEYS).
    """
    ours_kw = {k: v for k, v in kw.items() if k not in REF_KEYS}
    ref_kw = {k: v for k, v in kw.items() if k in REF_KEYS}
    inputs = [b[k].detach().clone().requires_grad_(True) for k in ("cw", "cl", "rw", "rl")]
    ours = dict(b, cw=inputs[0], cl=inputs[1], rw=inputs[2], rl=inputs[3])
    losses, _ = call(loss_type, ours, **ours_kw)
    assert losses.dtype == torch.float32
    coeffs = torch.rand(losses.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad((losses * coeffs.float()).sum(), inputs, allow_unused=True)

    inputs64 = [x.detach().double().requires_grad_(True) for x in inputs]
    ref = {**b, **dict(zip(("cw", "cl", "rw", "rl"), inputs64)), "nw": b["nw"].double(), "nl": b["nl"].double(),
           "mw": b["mw"].double(), "ml": b["ml"].double()}
    if loss_type == "sppo":
        ref_kw["probs"] = b["probs"].double()
    want = expected(loss_type, ref, **ref_kw)
    grads64 = torch.autograd.grad((want * coeffs).sum(), inputs64, allow_unused=True)

    assert rel_err(losses, want) <= tol, (loss_type, rel_err(losses, want))
    for name, got, ref_grad in zip(("chosen", "rejected", "ref_chosen", "ref_rejected"), grads, grads64):
        if ref_grad is None:
            assert got is None or float(got.abs().max()) == 0.0
            continue
        assert rel_err(got, ref_grad) <= tol, (loss_type, name, rel_err(got, ref_grad))


def _kw(loss_type):
    """Label smoothing where the type accepts it and it changes the loss."""
    if loss_type in ("robust", "exo_pair", "aot", "aot_unpaired", "sigmoid", "simpo", "alphapo", "cpo"):
        return {"label_smoothing": 0.1, "eps": 0.1}
    return {}


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_each_loss_matches_float64_formula(loss_type):
    for seed in range(3):
        kw = _kw(loss_type) if seed else {}
        if loss_type == "exo_pair" and not kw:
            kw = {"label_smoothing": 1e-3, "eps": 1e-3}
        check_against_float64(loss_type, make_batch(seed), 1e-5, seed, **kw)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "discopop", "sigmoid_norm"])
def test_f_divergences_match_float64_formula(kind, loss_type):
    for seed, coef in ((3, 0.5), (4, 1.7)):
        kw = {"f_divergence_type": kind, "f_alpha_divergence_coef": coef, "f": kind, "coef": coef}
        if loss_type == "robust":
            kw.update(label_smoothing=0.2, eps=0.2)
        check_against_float64(loss_type, make_batch(seed), 1e-5, seed, **kw)


def test_alpha_divergence_exponent_is_clamped():
    b = make_batch(5)
    b["rw"] = b["cw"] + 500.0  # (α - 1) · Δ_w = 250 would overflow exp
    losses, _ = call("sigmoid", b, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5)
    chosen_score = math.expm1(80.0) / -0.5
    dl = (b["cl"] - b["rl"]).double()
    want = torch.nn.functional.softplus(-BETA * (chosen_score - (torch.exp(-0.5 * dl) - 1) / -0.5))
    assert torch.isfinite(losses).all()
    assert rel_err(losses, want) <= 1e-5


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_bf16_inputs(loss_type):
    b = make_batch(7, dtype=torch.bfloat16)
    kw = {"label_smoothing": 1e-3, "eps": 1e-3} if loss_type == "exo_pair" else {}
    check_against_float64(loss_type, b, 1e-2, 7, **kw)


def test_loss_types_differ():
    b = make_batch(11)
    values = {}
    for loss_type in sorted(LOSSES):
        kw = {k: v for k, v in _kw(loss_type).items() if k not in REF_KEYS}
        values[loss_type] = call(loss_type, b, **kw)[0]
    names = sorted(values)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert not torch.allclose(values[first], values[second], rtol=1e-3), (first, second)


def test_weighted_combination_and_rpo():
    b = make_batch(12)
    combined, metrics = call(["sigmoid", "sft", "hinge"], b, loss_weights=[1.0, 0.5, 0.25])
    parts = [call(t, b)[0] for t in ("sigmoid", "sft", "hinge")]
    assert rel_err(combined, parts[0] + 0.5 * parts[1] + 0.25 * parts[2]) <= 1e-6
    assert "nll_loss" in metrics
    # The RPO objective: DPO plus α times the token-mean NLL of the chosen completions over the batch.
    rpo = call(["sigmoid", "sft"], b, loss_weights=[1.0, 2.0])[0].mean()
    want = parts[0].mean() - 2.0 * b["cw"].sum() / b["nw"].sum()
    assert abs(float(rpo - want)) <= 1e-5 * abs(float(want))
    assert not torch.allclose(combined, parts[0])


def test_soft_labels_generalise_hard_ones():
    b = make_batch(13)
    smoothed = call("sigmoid", b, label_smoothing=0.2)[0]
    soft = call("sigmoid", b, preference_probs=torch.full((P,), 0.8))[0]
    assert rel_err(soft, smoothed) <= 1e-6
    hard = call("sppo_hard", b)[0]
    assert rel_err(call("sppo", b, preference_probs=torch.ones(P))[0], hard) <= 1e-6
    assert not torch.allclose(call("sppo", b)[0], hard)
    check_against_float64("sigmoid", b, 1e-5, 13, preference_probs=b["probs"], probs=b["probs"].double())


def test_dpop_penalty_only_when_chosen_loses_likelihood():
    b = make_batch(14)
    b["rw"] = b["cw"] - 1.0  # policy above the reference on every chosen completion
    assert rel_err(call("dpop", b)[0], call("sigmoid", b)[0]) <= 1e-6
    b["rw"] = b["cw"] + 1.0
    assert (call("dpop", b)[0] > call("sigmoid", b)[0]).all()


def test_reference_free_losses_need_no_reference():
    b = make_batch(15)
    for loss_type in ("simpo", "alphapo", "cpo", "orpo"):
        losses, metrics = pairwise_loss(b["cw"], b["cl"], loss_type=loss_type, beta=BETA,
                                        chosen_lengths=b["nw"], rejected_lengths=b["nl"], **PARAMS)
        assert rel_err(losses, call(loss_type, b)[0]) <= 1e-7
        assert torch.isfinite(torch.stack(list(metrics.values()))).all()
    with_alpha_zero = call("alphapo", b, alpha=0.0)[0]
    assert rel_err(with_alpha_zero, call("simpo", b)[0]) <= 1e-6
    by_ratio = call("simpo", b, simpo_gamma=0.0, gamma_beta_ratio=PARAMS["simpo_gamma"] / BETA)[0]
    assert rel_err(by_ratio, call("simpo", b)[0]) <= 1e-6


def test_metrics_names_and_values():
    b = make_batch(16)
    _, m = call("sigmoid", b)
    rc, rr = BETA * (b["cw"] - b["rw"]), BETA * (b["cl"] - b["rl"])
    want = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
            "rewards/accuracies": (rc > rr).float().mean(), "rewards/margins": (rc - rr).mean(),
            "logps/chosen": b["cw"].mean(), "logps/rejected": b["cl"].mean()}
    assert set(m) == set(want)
    for key, value in want.items():
        assert m[key].dim() == 0 and not m[key].requires_grad
        assert abs(float(m[key] - value)) <= 1e-5 * max(1.0, abs(float(value))), key
    assert 0 < float(m["rewards/accuracies"]) < 1

    _, m = call("simpo", b)
    assert abs(float(m["rewards/chosen"] - BETA * (b["cw"] / b["nw"]).mean())) <= 1e-6
    _, m = call("orpo", b)
    ref = {k: v.double() for k, v in b.items() if isinstance(v, torch.Tensor)}
    assert abs(float(m["log_odds_chosen"]) - float(log_odds(ref).mean())) <= 1e-5
    assert abs(float(m["log_odds_ratio"]) - float(ls(log_odds(ref)).mean())) <= 1e-5
    assert abs(float(m["nll_loss"]) - float(nll(ref).mean())) <= 1e-5


def test_wpo_pair_weights_scale_losses_without_gradient():
    b = make_batch(17)
    chosen = b["cw"].clone().requires_grad_(True)
    w = torch.rand(P, requires_grad=True)
    weighted = call("sigmoid", dict(b, cw=chosen), pair_weights=w)[0]
    plain = call("sigmoid", dict(b, cw=chosen))[0]
    assert rel_err(weighted, plain * w.detach()) <= 1e-6
    grad_weighted, grad_w = torch.autograd.grad(weighted.sum(), (chosen, w), allow_unused=True)
    assert grad_w is None
    assert rel_err(grad_weighted, torch.autograd.grad((plain * w.detach()).sum(), chosen)[0]) <= 1e-6


def test_never_nan_on_extreme_inputs():
    g = torch.Generator().manual_seed(18)
    n = torch.randint(1, 4000, (P,), generator=g).float()
    b = {"cw": -torch.rand(P, generator=g) * 4e4, "cl": -torch.rand(P, generator=g) * 4e4,
         "rw": -torch.rand(P, generator=g) * 4e4, "rl": -torch.rand(P, generator=g) * 4e4, "nw": n, "nl": n.flip(0),
         "mw": torch.randn(P, 2), "ml": torch.randn(P, 2), "modpo_weights": [0.5, 0.5, 0.5], "probs": torch.rand(P)}
    b["cw"][0], b["cl"][0] = -1e-7, 0.0  # log-probs ~0 and rounded to 0: ORPO's log(1 - p) at its edge
    for loss_type in sorted(LOSSES):
        inputs = [b[k].clone().requires_grad_(True) for k in ("cw", "cl", "rw", "rl")]
        ours = dict(b, cw=inputs[0], cl=inputs[1], rw=inputs[2], rl=inputs[3])
        kw = {"label_smoothing": 0.1} if loss_type == "exo_pair" else {}
        losses, metrics = call(loss_type, ours, **kw)
        assert not torch.isnan(losses).any(), loss_type
        grads = torch.autograd.grad(losses.mean(), inputs, allow_unused=True)
        assert all(g is None or not torch.isnan(g).any() for g in grads), loss_type
        assert not any(torch.isnan(v) for v in metrics.values()), loss_type


def test_pipeline_from_materialised_logits():
    """linear_logprobs -> sequence_sum -> pairwise_loss, against the same pipeline in float64."""
    g = torch.Generator().manual_seed(19)
    pairs, length, hidden_size, vocab = 4, 7, 16, 50
    hidden = torch.randn(2 * pairs, length, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) * 0.3
    targets = torch.randint(0, vocab, (2 * pairs, length), generator=g)
    targets[:, :2] = -100  # prompt
    targets[1, 5:] = -100  # padding
    targets[6, 4:] = -100
    ref_logps = torch.randn(2 * pairs, generator=g) - 10.0
    mask = targets != -100
    lengths = mask.sum(1)

    def run(h, w):
        token_logps = linear_logprobs(h, w, targets)
        if h.dtype == torch.float64:  # prefops.sequence_sum accumulates in fp32
            logps = (token_logps * mask).sum(1)
        else:
            logps = prefops.sequence_sum(token_logps, mask)
        lw, ll = lengths[:pairs], lengths[pairs:]
        losses, _ = pairwise_loss(logps[:pairs], logps[pairs:], ref_logps[:pairs].to(logps.dtype),
                                  ref_logps[pairs:].to(logps.dtype), loss_type=["sigmoid", "ipo", "sft"],
                                  loss_weights=[1.0, 0.1, 0.5], beta=BETA, chosen_lengths=lw, rejected_lengths=ll)
        return losses.mean()

    h32, w32 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    loss32, loss64 = run(h32, w32), run(h64, w64)
    grads32 = torch.autograd.grad(loss32, (h32, w32))
    grads64 = torch.autograd.grad(loss64, (h64, w64))
    assert loss64.dtype == torch.float64
    assert rel_err(loss32.reshape(1), loss64.reshape(1)) <= 1e-5
    for got, want in zip(grads32, grads64):
        assert rel_err(got, want) <= 1e-5


def test_ld_dpo_token_weights():
    chosen = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    rejected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    wc, wr = ld_dpo_token_weights(chosen, rejected, 0.25)
    assert wc.tolist() == [[0, 1, 1, 0.25, 0.25, 0], [0, 1, 1, 0, 0, 0]]
    assert wr.tolist() == [[1, 1, 0, 0], [1, 1, 0.25, 0.25]]
    token_logps = -torch.rand(2, 6)
    weighted = prefops.sequence_sum(token_logps, wc)
    assert torch.allclose(weighted[0], token_logps[0, 1:3].sum() + 0.25 * token_logps[0, 3:5].sum())
    plain = prefops.sequence_sum(token_logps, chosen)
    assert torch.equal(prefops.sequence_sum(token_logps, ld_dpo_token_weights(chosen, rejected, 1.0)[0]), plain)
    with pytest.raises(ValueError, match="alpha"):
        ld_dpo_token_weights(chosen, rejected, 1.5)
    with pytest.raises(ValueError, match="batch size"):
        ld_dpo_token_weights(chosen, rejected[:1], 0.5)


def test_wpo_weights_from_logits():
    g = torch.Generator().manual_seed(20)
    hidden, weight = torch.randn(3, 5, 8, generator=g), torch.randn(11, 8, generator=g)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    targets[2, 3:] = -100
    mask = targets != -100
    logps = linear_logprobs(hidden, weight, targets)
    log_p2 = torch.log(token_sum_p2(hidden, weight, targets))
    on_mask = lambda values: torch.where(mask, values, 0.0).sum(1)  # noqa: E731 - log 0 = -inf off the mask
    w = wpo_weights(on_mask(logps), on_mask(log_p2), mask.sum(1))
    probs = torch.softmax(hidden.double() @ weight.double().T, -1)
    want = []
    for i in range(3):
        rows = [float(torch.log(probs[i, t, targets[i, t]]) - torch.log((probs[i, t] ** 2).sum()))
                for t in range(5) if mask[i, t]]
        want.append(math.exp(sum(rows) / len(rows)))
    assert rel_err(w, torch.tensor(want)) <= 1e-5
    assert not w.requires_grad
    with pytest.raises(ValueError, match=r"lengths\[1\] = 0"):
        wpo_weights(w, w, torch.tensor([4, 0, 3]))
    with pytest.raises(ValueError, match="one shape"):
        wpo_weights(w, w, torch.tensor([4, 3]))


def test_diffusion_dpo_and_mapo():
    g = torch.Generator().manual_seed(21)
    errs = [torch.rand(P, generator=g) * 0.2 for _ in range(4)]
    inputs = [e.clone().requires_grad_(True) for e in errs]
    losses, metrics = diffusion_dpo_loss(*inputs, beta=0.01, num_timesteps=1000)
    e64 = [e.double().requires_grad_(True) for e in errs]
    inside = -0.01 * 1000 * ((e64[0] - e64[2]) - (e64[1] - e64[3]))
    want = -ls(inside)
    assert rel_err(losses, want) <= 1e-5
    for got, ref in zip(torch.autograd.grad(losses.sum(), inputs), torch.autograd.grad(want.sum(), e64)):
        assert rel_err(got, ref) <= 1e-5
    assert abs(float(metrics["implicit_acc"]) - float((inside > 0).double().mean())) < 1e-7

    inputs = [e.clone().requires_grad_(True) for e in errs[:2]]
    losses, metrics = mapo_loss(*inputs, beta=0.1, snr_value=2.0, num_timesteps=1000)
    e64 = [e.double().requires_grad_(True) for e in errs[:2]]

    def g_(x):
        return x / (torch.exp(x) - 1)

    want = e64[0] - 0.1 * ls(1000 * (g_(2.0 * e64[0]) - g_(2.0 * e64[1])))
    assert rel_err(losses, want) <= 1e-5
    for got, ref in zip(torch.autograd.grad(losses.sum(), inputs), torch.autograd.grad(want.sum(), e64)):
        assert rel_err(got, ref) <= 1e-5
    assert not torch.allclose(losses, diffusion_dpo_loss(*errs, beta=0.01)[0].float())
    zero = torch.zeros(2, requires_grad=True)
    out = mapo_loss(zero, torch.tensor([0.0, 1e-6]))[0]
    assert torch.isfinite(out).all() and torch.isfinite(torch.autograd.grad(out.sum(), zero)[0]).all()
    with pytest.raises(ValueError, match="beta"):
        diffusion_dpo_loss(*errs, beta=-1.0)
    with pytest.raises(ValueError, match="model_err_l"):
        mapo_loss(errs[0], errs[1][:3])


# ---- bad input ---------------------------------------------------------------------------------------------


def test_unknown_loss_type_lists_valid_ones():
    b = make_batch(30)
    with pytest.raises(ValueError, match="valid: .*sigmoid.*simpo"):
        call("dpo++", b)
    with pytest.raises(ValueError, match="dpo\\+\\+"):
        call(["sigmoid", "dpo++"], b)


@pytest.mark.parametrize("loss_type,smoothing,match", [
    ("robust", 0.5, r"label_smoothing .*robust.* \[0.0, 0.5\)"),
    ("robust", -0.1, "label_smoothing"),
    ("exo_pair", 0.0, r"label_smoothing .*exo_pair.* \(0.0, 1.0\)"),
    ("sigmoid", 1.5, r"label_smoothing must lie in \[0.0, 1.0\]"),
])
def test_label_smoothing_domain(loss_type, smoothing, match):
    with pytest.raises(ValueError, match=match):
        call(loss_type, make_batch(31), label_smoothing=smoothing)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "simpo", "orpo", "alphapo", "sft"])
def test_length_normalised_losses_need_lengths(loss_type):
    b = make_batch(32)
    with pytest.raises(ValueError, match=f"'{loss_type}' needs (chosen|rejected)_lengths"):
        pairwise_loss(b["cw"], b["cl"], b["rw"], b["rl"], loss_type=loss_type)


@pytest.mark.parametrize("beta", [-0.1, 0.0, float("nan"), float("inf")])
def test_beta_domain(beta):
    b = make_batch(33)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        pairwise_loss(b["cw"], b["cl"], b["rw"], b["rl"], beta=beta)


def test_mismatched_shapes_name_the_argument():
    b = make_batch(34)
    with pytest.raises(ValueError, match="ref_rejected_logps must have the shape of chosen_logps"):
        pairwise_loss(b["cw"], b["cl"], b["rw"], b["rl"][:-1])
    with pytest.raises(ValueError, match="chosen_lengths must have the shape"):
        pairwise_loss(b["cw"], b["cl"], b["rw"], b["rl"], loss_type="ipo", chosen_lengths=b["nw"][:3],
                      rejected_lengths=b["nl"])
    with pytest.raises(ValueError, match=r"chosen_logps must have shape \[P\]"):
        pairwise_loss(b["cw"].reshape(4, 4), b["cl"])


def test_empty_completion_names_the_pair():
    b = make_batch(35)
    b["nl"][5] = 0
    with pytest.raises(ValueError, match=r"rejected_lengths\[5\] = 0: pair 5 has no completion tokens"):
        call("sigmoid", b)


def test_missing_reference_names_the_argument():
    b = make_batch(36)
    with pytest.raises(ValueError, match="'sigmoid' needs ref_chosen_logps"):
        pairwise_loss(b["cw"], b["cl"])
    with pytest.raises(ValueError, match="ref_rejected_logps is None"):
        pairwise_loss(b["cw"], b["cl"], b["rw"])
    with pytest.raises(ValueError, match="'sppo' needs preference_probs"):
        call("sppo", {**b, "probs": None})
    with pytest.raises(ValueError, match="'modpo' needs chosen_margin_rewards"):
        pairwise_loss(b["cw"], b["cl"], b["rw"], b["rl"], loss_type="modpo", modpo_weights=[1.0, 0.5])


def test_other_parameter_errors():
    b = make_batch(37)
    with pytest.raises(ValueError, match="f_divergence_type=.*forward_kl.*'nca_pair'"):
        call("nca_pair", b, f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="f_divergence_type must be one of"):
        call("sigmoid", b, f_divergence_type="kl")
    with pytest.raises(ValueError, match="loss_weights must be 2 finite numbers"):
        call(["sigmoid", "sft"], b, loss_weights=[1.0])
    with pytest.raises(TypeError, match="unknown parameter.*'dpo_lambda'"):
        call("dpop", b, dpo_lambda=1.0)
    with pytest.raises(ValueError, match="preference_probs must lie in"):
        call("sigmoid", b, preference_probs=b["probs"] + 1)
    with pytest.raises(ValueError, match="either preference_probs"):
        call("sigmoid", b, preference_probs=b["probs"], label_smoothing=0.1)
    with pytest.raises(ValueError, match="modpo_weights"):
        call("modpo", b, modpo_weights=[0.0, 1.0])
    with pytest.raises(ValueError, match="pair_weights cannot be used with 'aot'"):
        call("aot", b, pair_weights=torch.ones(P))
    with pytest.raises(ValueError, match="discopop_tau"):
        call("discopop", b, discopop_tau=0.0)


def _without_reference_kw(loss_type, b):
    """Every other input a loss type may need, so that only the reference is missing."""
    kw = dict(PARAMS, chosen_margin_rewards=b["mw"], rejected_margin_rewards=b["ml"], modpo_weights=[0.6, 0.3, 0.1])
    if loss_type == "sppo":
        kw["preference_probs"] = b["probs"]
    if loss_type == "exo_pair":
        kw["label_smoothing"] = 0.1
    return kw


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_reference_free_set_is_exactly_the_losses_that_read_no_reference(loss_type):
    b = make_batch(40)
    run = lambda: pairwise_loss(b["cw"], b["cl"], loss_type=loss_type, beta=BETA, chosen_lengths=b["nw"],  # noqa: E731
                                rejected_lengths=b["nl"], **_without_reference_kw(loss_type, b))
    if loss_type not in prefops.losses.REFERENCE_FREE:
        with pytest.raises(ValueError, match=f"'{loss_type}' needs ref_chosen_logps"):
            run()
        return
    losses, metrics = run()
    nan = torch.full((P,), float("nan"), dtype=torch.float64)  # a formula that read the reference would fail
    b64 = {**b, **{k: b[k].double() for k in ("cw", "cl", "nw", "nl")}, "rw": nan, "rl": nan}
    assert rel_err(losses, expected(loss_type, b64)) <= 1e-5
    assert torch.isfinite(torch.stack(list(metrics.values()))).all()


def test_reference_free_combination_needs_no_reference():
    b = make_batch(41)
    losses, _ = pairwise_loss(b["cw"], b["cl"], loss_type=["simpo", "sft"], loss_weights=[1.0, 0.4], beta=BETA,
                              chosen_lengths=b["nw"], rejected_lengths=b["nl"], **PARAMS)
    b64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
    assert rel_err(losses, expected("simpo", b64) + 0.4 * expected("sft", b64)) <= 1e-5
    with pytest.raises(ValueError, match="'sigmoid' needs ref_chosen_logps"):
        pairwise_loss(b["cw"], b["cl"], loss_type=["simpo", "sigmoid"], beta=BETA, chosen_lengths=b["nw"],
                      rejected_lengths=b["nl"])


def _grads_against_float64(loss_fn, formula, b, names, tol=1e-5):
    """loss_fn(inputs) and formula(inputs64) on the tensors `names` of b: values and gradients of
    Σ_i c_i loss_i (random c_i) agree to tol."""
    inputs = {k: b[k].detach().clone().requires_grad_(True) for k in names}
    losses, metrics = loss_fn(inputs)
    coeffs = torch.rand(losses.shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad((losses * coeffs.float()).sum(), list(inputs.values()), allow_unused=True)
    inputs64 = {k: v.detach().double().requires_grad_(True) for k, v in inputs.items()}
    want = formula(inputs64)
    grads64 = torch.autograd.grad((want * coeffs).sum(), list(inputs64.values()), allow_unused=True)
    assert rel_err(losses, want) <= tol
    for name, got, ref_grad in zip(names, grads, grads64):
        if ref_grad is None:
            assert got is None or float(got.abs().max()) == 0.0, name
        else:
            assert rel_err(got, ref_grad) <= tol, name
    return metrics


def test_orpo_without_nll_is_the_odds_ratio_term():
    """orpo_nll=False: -β log σ(log odds) alone (Liger's compute_nll_loss=False); with "sft" it is ORPO again."""
    b = make_batch(42)

    def odds_term(x):
        return -BETA * ls(log_odds({**b, **x, "nw": b["nw"].double(), "nl": b["nl"].double()}))

    def nll64(x):
        return -x["cw"] / b["nw"].double().mean()

    metrics = _grads_against_float64(
        lambda x: pairwise_loss(x["cw"], x["cl"], loss_type="orpo", beta=BETA, chosen_lengths=b["nw"],
                                rejected_lengths=b["nl"], orpo_nll=False), odds_term, b, ("cw", "cl"))
    assert "nll_loss" not in metrics and "log_odds_ratio" in metrics
    _grads_against_float64(
        lambda x: pairwise_loss(x["cw"], x["cl"], loss_type=["orpo", "sft"], loss_weights=[1.0, 0.3], beta=BETA,
                                chosen_lengths=b["nw"], rejected_lengths=b["nl"], orpo_nll=False),
        lambda x: odds_term(x) + 0.3 * nll64(x), b, ("cw", "cl"))
    _grads_against_float64(
        lambda x: pairwise_loss(x["cw"], x["cl"], loss_type="orpo", beta=BETA, chosen_lengths=b["nw"],
                                rejected_lengths=b["nl"], orpo_nll=True),
        lambda x: odds_term(x) + nll64(x), b, ("cw", "cl"))


@pytest.mark.parametrize("loss_type", ["sft", "cpo", "orpo"])
def test_nll_term_on_other_targets(loss_type):
    """chosen_nll_logps / chosen_nll_lengths: the NLL is -Σ s^nll_w / Σ n^nll_w (TRL's ORPO over prompt and
    completion); the rest of the loss still reads chosen_logps."""
    b = make_batch(43)
    g = torch.Generator().manual_seed(44)
    b["nll_n"] = b["nw"] + torch.randint(1, 9, (P,), generator=g).float()  # prompt tokens too
    b["nll_s"] = b["cw"] - torch.rand(P, generator=g) * b["nll_n"]
    nll_n = b["nll_n"].double()

    def formula(x, mean_length=None):
        batch = {**b, **x, "nw": b["nw"].double(), "nl": b["nl"].double()}
        nll_term = -x["nll_s"] / (nll_n.mean() if mean_length is None else mean_length)
        if loss_type == "sft":
            return nll_term
        if loss_type == "cpo":
            return -ls(BETA * (x["cw"] - x["cl"])) + PARAMS["cpo_alpha"] * nll_term
        return nll_term - BETA * ls(log_odds(batch))

    def ours(x, **kw):
        return pairwise_loss(x["cw"], x["cl"], b["rw"], b["rl"], loss_type=loss_type, beta=BETA,
                             chosen_lengths=b["nw"], rejected_lengths=b["nl"], cpo_alpha=PARAMS["cpo_alpha"],
                             chosen_nll_logps=x["nll_s"], chosen_nll_lengths=b["nll_n"], **kw)

    metrics = _grads_against_float64(ours, formula, b, ("cw", "cl", "nll_s"))
    token_mean_nll = -b["nll_s"].double().sum() / nll_n.sum()
    assert abs(float(metrics["nll_loss"]) - float(token_mean_nll)) <= 1e-5 * float(token_mean_nll)
    # A caller's nll_mean_length (a whole step's) wins over this batch's mean.
    _grads_against_float64(lambda x: ours(x, nll_mean_length=7.5), lambda x: formula(x, 7.5), b,
                           ("cw", "cl", "nll_s"))


def test_nll_options_bad_input():
    b = make_batch(45)
    nll = dict(chosen_nll_logps=b["cw"] - 1, chosen_nll_lengths=b["nw"] + 2)
    with pytest.raises(ValueError, match="orpo_nll must be True or False; got 'no'"):
        call("orpo", b, orpo_nll="no")
    with pytest.raises(ValueError, match=r"chosen_nll_logps is given but no NLL term of loss_type \['sigmoid'\]"):
        call("sigmoid", b, **nll)
    with pytest.raises(ValueError, match="no NLL term.*'orpo' \\(orpo_nll=True\\)"):
        call("orpo", b, orpo_nll=False, **nll)
    with pytest.raises(ValueError, match="no NLL term"):
        call("cpo", b, cpo_alpha=0.0, **nll)
    with pytest.raises(ValueError, match="chosen_nll_lengths is given without chosen_nll_logps"):
        call("orpo", b, chosen_nll_lengths=b["nw"])
    with pytest.raises(ValueError, match="'orpo' needs chosen_nll_lengths"):
        call("orpo", b, chosen_nll_logps=b["cw"] - 1)
    with pytest.raises(ValueError, match=r"chosen_nll_lengths\[2\] = 0"):
        call("orpo", b, chosen_nll_logps=b["cw"] - 1, chosen_nll_lengths=b["nw"].index_fill(0, torch.tensor(2), 0))
    with pytest.raises(ValueError, match="chosen_nll_logps must have the shape of chosen_logps"):
        call("orpo", b, chosen_nll_logps=b["cw"][:3], chosen_nll_lengths=b["nw"][:3])
