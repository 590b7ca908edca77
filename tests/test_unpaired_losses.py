"""KTO and BCO against plain float64 formulas."""
import pytest
import torch

from prefops.losses import BCOLoss, kto_kl_estimate, kto_loss

N = 12
BETA = 0.3


def make(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(N, generator=g, dtype=torch.float64) * 30
    ref = policy + torch.randn(N, generator=g, dtype=torch.float64) * 2
    labels = torch.rand(N, generator=g) < 0.5
    labels[0], labels[1] = True, False
    return policy.to(dtype), ref.to(dtype), labels


def rel_err(actual, want):
    actual, want = actual.detach().double(), want.detach().double()
    assert torch.isfinite(actual).all() and torch.isfinite(want).all()
    return float((actual - want).norm() / want.norm().clamp_min(1e-30))


def kto_expected(policy, ref, labels, kl, wd, wu):
    """KTO (arXiv:2402.01306, Eq. 7): v = λ_D σ(β(Δ - z0)) or λ_U σ(β(z0 - Δ)); loss = λ - v."""
    delta = policy - ref
    out = []
    for i in range(N):
        if labels[i]:
            out.append(wd * (1 - torch.sigmoid(BETA * (delta[i] - kl))))
        else:
            out.append(wu * (1 - torch.sigmoid(BETA * (kl - delta[i]))))
    return torch.stack(out)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_kto_matches_float64_formula(dtype, tol):
    for seed in range(3):
        policy, ref, labels = make(seed, dtype)
        kl = 0.4 * seed
        policy = policy.clone().requires_grad_(True)
        losses, _ = kto_loss(policy, ref, labels, beta=BETA, kl=kl, desirable_weight=1.3, undesirable_weight=0.7)
        assert losses.dtype == torch.float32
        p64 = policy.detach().double().requires_grad_(True)
        want = kto_expected(p64, ref.double(), labels, kl, 1.3, 0.7)
        assert rel_err(losses, want) <= tol
        grad = torch.autograd.grad(losses.mean(), policy)[0]
        assert rel_err(grad, torch.autograd.grad(want.mean(), p64)[0]) <= tol


def test_kto_kl_estimate_and_apo_zero_unpaired():
    policy, ref, labels = make(3)
    kl_policy = (policy + torch.rand(N)).requires_grad_(True)
    z0 = kto_kl_estimate(kl_policy, ref)
    assert not z0.requires_grad and z0.dim() == 0
    assert abs(float(z0) - float((kl_policy.detach() - ref).mean())) <= 1e-5
    assert float(kto_kl_estimate(ref, kl_policy.detach())) == 0.0  # negative estimate clamped to 0
    # A given kl is used as given (a negative one too: the clamp belongs to the estimate), and detached.
    given, metrics = kto_loss(policy, ref, labels, beta=BETA, kl=torch.tensor(-2.0, requires_grad=True))
    assert not given.requires_grad
    assert rel_err(given, kto_expected(policy.double(), ref.double(), labels, -2.0, 1.0, 1.0)) <= 1e-6
    assert float(metrics["kl"]) == -2.0
    apo, _ = kto_loss(policy, ref, labels, beta=BETA, loss_type="apo_zero_unpaired")
    delta = (policy - ref).double()
    want = torch.where(labels, 1 - torch.sigmoid(BETA * delta), torch.sigmoid(BETA * delta))
    assert rel_err(apo, want) <= 1e-5
    assert not torch.allclose(apo, kto_loss(policy, ref, labels, beta=BETA, kl=1.0)[0])


def test_kto_metrics():
    policy, ref, labels = make(4)
    _, m = kto_loss(policy, ref, labels, beta=BETA, kl=0.25)
    rewards = BETA * (policy - ref)
    assert abs(float(m["rewards/chosen"] - rewards[labels].mean())) <= 1e-6
    assert abs(float(m["rewards/rejected"] - rewards[~labels].mean())) <= 1e-6
    assert abs(float(m["rewards/margins"] - (rewards[labels].mean() - rewards[~labels].mean()))) <= 1e-6
    assert abs(float(m["logps/chosen"] - policy[labels].mean())) <= 1e-4
    assert abs(float(m["logps/rejected"] - policy[~labels].mean())) <= 1e-4
    assert float(m["kl"]) == 0.25
    _, only_desirable = kto_loss(policy, ref, torch.ones(N, dtype=torch.bool), beta=BETA, kl=0.0)
    assert "rewards/rejected" not in only_desirable and "rewards/margins" not in only_desirable


def test_kto_bad_input():
    policy, ref, labels = make(5)
    with pytest.raises(ValueError, match="needs kl"):
        kto_loss(policy, ref, labels)
    with pytest.raises(TypeError, match="labels must be a bool tensor"):
        kto_loss(policy, ref, labels.long(), kl=0.0)
    with pytest.raises(ValueError, match="labels must have the shape"):
        kto_loss(policy, ref, labels[:3], kl=0.0)
    with pytest.raises(ValueError, match="ref_logps must have the shape"):
        kto_loss(policy, ref[:3], labels, kl=0.0)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(policy, ref, labels, kl=0.0, beta=-1.0)
    with pytest.raises(ValueError, match="desirable_weight"):
        kto_loss(policy, ref, labels, kl=0.0, desirable_weight=-1.0)
    with pytest.raises(ValueError, match="valid: 'apo_zero_unpaired', 'kto'"):
        kto_loss(policy, ref, labels, kl=0.0, loss_type="kto_pair")


def bco_expected(policy, ref, labels, delta0):
    """BCO (arXiv:2404.04656): -log σ(r - δ0) if desirable, -log σ(δ0 - r) if not, r = β Δ."""
    r = BETA * (policy - ref)
    return torch.where(labels, -torch.log(torch.sigmoid(r - delta0)), -torch.log(torch.sigmoid(delta0 - r)))


def test_bco_running_mean_and_loss():
    module = BCOLoss(beta=BETA)
    seen = []
    for seed in range(3):
        policy, ref, labels = make(10 + seed)
        policy = policy.clone().requires_grad_(True)
        seen.append(BETA * (policy.detach() - ref).double())
        losses, metrics = module(policy, ref, labels)
        delta0 = torch.cat(seen).mean()  # the mean of every reward seen so far, this batch included
        assert abs(float(module.delta) - float(delta0)) <= 1e-6
        assert abs(float(metrics["delta"]) - float(delta0)) <= 1e-6
        p64 = policy.detach().double().requires_grad_(True)
        want = bco_expected(p64, ref.double(), labels, delta0)
        assert rel_err(losses, want) <= 1e-5
        grad = torch.autograd.grad(losses.mean(), policy)[0]
        assert rel_err(grad, torch.autograd.grad(want.mean(), p64)[0]) <= 1e-5
        assert "rewards/chosen" in metrics and "logps/rejected" in metrics

    frozen = float(module.delta)
    module.eval()
    module(*make(20))
    assert float(module.delta) == frozen
    state = module.state_dict()
    assert set(state) == {"delta", "count"}
    restored = BCOLoss(beta=BETA)
    restored.load_state_dict(state)
    policy, ref, labels = make(21)
    assert torch.equal(restored.eval()(policy, ref, labels)[0], module(policy, ref, labels)[0])
    with pytest.raises(ValueError, match="beta"):
        BCOLoss(beta=0.0)


def test_kto_given_reference_point_is_not_clamped():
    """kto_loss uses kl as given, negative values too (Liger's KTO does); only kto_kl_estimate clamps."""
    for seed, kl in ((6, -1.5), (7, -0.2), (8, torch.tensor(0.6, dtype=torch.float64))):
        policy, ref, labels = make(seed)
        policy = policy.clone().requires_grad_(True)
        losses, metrics = kto_loss(policy, ref, labels, beta=BETA, kl=kl, desirable_weight=1.3, undesirable_weight=0.7)
        p64 = policy.detach().double().requires_grad_(True)
        want = kto_expected(p64, ref.double(), labels, float(kl), 1.3, 0.7)
        assert rel_err(losses, want) <= 1e-5
        grad = torch.autograd.grad(losses.mean(), policy)[0]
        assert rel_err(grad, torch.autograd.grad(want.mean(), p64)[0]) <= 1e-5
        assert float(metrics["kl"]) == pytest.approx(float(kl))


def test_kto_reference_point_bad_input():
    policy, ref, labels = make(9)
    with pytest.raises(ValueError, match="kl must be finite; got nan"):
        kto_loss(policy, ref, labels, kl=float("nan"))
    with pytest.raises(ValueError, match="kl must be finite; got inf"):
        kto_loss(policy, ref, labels, kl=torch.tensor(float("inf")))
    with pytest.raises(ValueError, match=r"kl must be a scalar; got shape \(2,\)"):
        kto_loss(policy, ref, labels, kl=torch.zeros(2))
