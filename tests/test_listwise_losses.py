"""Listwise losses against plain float64 formulas written from the papers, per list in Python loops."""
import math

import pytest
import torch

from conftest import grad_tolerance, relative_error, value_tolerance
from prefops.losses import pairwise_loss
from prefops.losses.curriculum import CurriculumPair, curriculum_pairs
from prefops.losses.listwise import LISTWISE_LOSSES, listwise_loss

P, K, BETA = 5, 5, 0.5
SIZES = [5, 2, 4, 3, 5]  # responses present per list
VALUES = value_tolerance(K, K * K)


def make_lists(dtype=torch.float32, sizes=SIZES, k=K, ties=True):
    """logps / ref / lengths [P, K] (magnitudes of real sequence sums), mask, scores and tied ranks."""
    p = len(sizes)
    mask = torch.arange(k)[None, :] < torch.tensor(sizes)[:, None]
    ref = torch.randn(p, k, dtype=torch.float64) * 20 - 60
    logps = ref + torch.randn(p, k, dtype=torch.float64) * 3
    lengths = torch.randint(5, 40, (p, k)).double()
    scores = torch.randn(p, k, dtype=torch.float64)
    ranks = torch.zeros(p, k, dtype=torch.long)
    for row, n in enumerate(sizes):
        base = int(torch.randint(0, 2, ()))
        values = torch.randperm(n)
        if ties and n > 2:  # competition ranking with one tie: e.g. 1 2 2 4
            values = torch.where(values == 2, 1, values)
        ranks[row, :n] = values + base
    cast = lambda x: torch.where(mask, x, 0.0).to(dtype)  # noqa: E731
    return cast(logps), cast(ref), cast(lengths), mask, scores, ranks


def labels_of(scores, ranks, mask):
    """ψ per list as Python lists: the score, or the number of responses ranked strictly below."""
    out = []
    for row in range(mask.shape[0]):
        n = int(mask[row].sum())
        if scores is not None:
            out.append([float(x) for x in scores[row, :n]])
        else:
            r = [int(x) for x in ranks[row, :n]]
            out.append([float(sum(b > a for b in r)) for a in r])
    return out


def sig_loss(x):
    return -torch.log(torch.sigmoid(x))


def lambda_weights(s, psi):
    """LiPO's λ_ij for i ≻ j (0 elsewhere): τ from sorting by s, ties toward larger ψ."""
    m = len(psi)
    order = sorted(range(m), key=lambda i: (-float(s[i].detach()), -psi[i]))
    tau = [0] * m
    for place, i in enumerate(order):
        tau[i] = place + 1
    return [[abs(2 ** psi[i] - 2 ** psi[j]) * abs(1 / math.log(1 + tau[i]) - 1 / math.log(1 + tau[j]))
             if psi[i] > psi[j] else 0.0 for j in range(m)] for i in range(m)]


def expected_list(loss_type, l, r, psi, n, from_scores, params):
    """One list's loss in float64 from the papers' formulas; l, r, n are 1-D tensors, psi a Python list."""
    m = len(psi)
    s = BETA * (l - r)
    worse = [[j for j in range(m) if psi[i] > psi[j]] for i in range(m)]
    if loss_type == "plackett_luce":
        position = [sum(psi[j] > psi[i] for j in range(m)) for i in range(m)]
        top_k = params.get("top_k") or m
        terms = [torch.log(torch.exp(s[i]) + sum(torch.exp(s[j]) for j in worse[i])) - s[i]
                 for i in range(m) if worse[i] and position[i] < top_k]
        return sum(terms) if terms else s.sum() * 0
    if loss_type in ("lipo_lambda", "dcg_pairwise"):
        lam = lambda_weights(s, psi)
        pairs = [(i, j) for i in range(m) for j in worse[i]]
        if loss_type == "lipo_lambda":
            return sum(lam[i][j] * torch.log1p(torch.exp(-(s[i] - s[j]))) for i, j in pairs)
        return sum(lam[i][j] * sig_loss(s[i] - s[j]) for i, j in pairs) / sum(lam[i][j] for i, j in pairs)
    if loss_type == "pro":
        rr = l / n
        total = 0
        for k in range(m):
            if not worse[k]:
                continue
            inv_t = {i: (psi[k] - psi[i] if from_scores else 1.0) for i in worse[k]}
            inv_kk = max(inv_t.values())
            denominator = torch.exp(rr[k] * inv_kk) + sum(torch.exp(rr[i] * inv_t[i]) for i in worse[k])
            total = total - torch.log(torch.exp(rr[k] * inv_kk) / denominator)
        best = [i for i in range(m) if psi[i] == max(psi)]
        return total - params.get("pro_sft_weight", 0.05) * sum(rr[i] for i in best) / len(best)
    if loss_type in ("adpo", "list_ce"):
        temperature = params.get("target_temperature", 1.0)
        if loss_type == "adpo" and params.get("target", "hard") == "hard":
            best = [float(p == max(psi)) for p in psi]
            q = torch.tensor(best, dtype=torch.float64) / sum(best)
        else:
            q = torch.softmax(torch.tensor(psi, dtype=torch.float64) / temperature, 0)
        log_p = s - torch.logsumexp(s, 0)
        ce = -(q * log_p).sum()
        if loss_type == "list_ce":
            return ce
        return ce + sum(float(qi) * math.log(float(qi)) for qi in q if qi > 0)
    if loss_type == "sppo_response":  # SPPO (arXiv:2405.00675) Eq. 4.6, η = 1/β: (log π/π_t - η (P̂ - ½))²
        return sum((l[k] - r[k] - (psi[k] - 0.5) / BETA) ** 2 for k in range(m))
    if loss_type == "gpo":  # GPO (arXiv:2410.02197): (log π/π_t - η s(y ≻ π_t))²
        return sum((l[k] - r[k] - psi[k] / BETA) ** 2 for k in range(m))
    if loss_type == "spo":  # SPO (arXiv:2401.04056): win rate as reward, REINFORCE with the list-mean baseline
        return -sum((psi[k] - sum(psi) / m) * l[k] for k in range(m))
    if loss_type == "all_pairs":
        pairs = [(i, j) for i in range(m) for j in worse[i]]
        kind = params["pairwise_type"]
        if kind == "sigmoid":
            return sum(sig_loss(s[i] - s[j]) for i, j in pairs) / len(pairs)
        if kind == "ipo":
            d = l - r
            return sum((d[i] / n[i] - d[j] / n[j] - 1 / (2 * BETA)) ** 2 for i, j in pairs) / len(pairs)
    raise AssertionError(loss_type)


def loss_terms(loss_of, logps, ref):
    """Per list, the size of a loss's terms in float64: |L| + sum |dL/dx| |x| over its inputs x (logps
    and ref). fp32 arithmetic on the same inputs rounds each of them and the loss a few times, in its
    log-sum-exps (K terms) and pair sums (K^2 terms): it is off by VALUES against them."""
    leaves = [x.double().requires_grad_() for x in (logps, ref)]
    losses = loss_of(*leaves)
    slopes = torch.autograd.grad(losses.sum(), leaves, allow_unused=True, materialize_grads=True)
    return (losses.abs() + sum((slope.abs() * x.abs()).sum(1) for slope, x in zip(slopes, leaves))).detach()


def expected_losses(loss_type, logps, ref, lengths, mask, scores, ranks, params):
    psi = labels_of(scores, ranks, mask)
    out = []
    for row in range(mask.shape[0]):
        n = int(mask[row].sum())
        out.append(expected_list(loss_type, logps[row, :n], ref[row, :n], psi[row], lengths[row, :n],
                                 scores is not None, params))
    return torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in out])


CASES = [
    ("plackett_luce", {}),
    ("plackett_luce", {"top_k": 2}),
    ("lipo_lambda", {}),
    ("pro", {}),
    ("pro", {"pro_sft_weight": 0.3}),
    ("adpo", {}),
    ("adpo", {"target": "soft", "target_temperature": 0.7}),
    ("list_ce", {"target_temperature": 2.0}),
    ("all_pairs", {"pairwise_type": "sigmoid"}),
    ("all_pairs", {"pairwise_type": "ipo"}),
    ("dcg_pairwise", {"pairwise_type": "sigmoid"}),
    ("sppo_response", {}),
    ("gpo", {}),
    ("spo", {}),
]


@pytest.mark.parametrize("labels", ["scores", "ranks"])
@pytest.mark.parametrize("loss_type,params", CASES, ids=lambda c: str(c))
def test_matches_float64_reference(loss_type, params, labels):
    logps, ref, lengths, mask, scores, ranks = make_lists()
    given = {"scores": scores} if labels == "scores" else {"ranks": ranks}
    leaf = logps.clone().requires_grad_()
    losses, _ = listwise_loss(leaf, ref, **given, mask=mask, lengths=lengths, loss_type=loss_type, beta=BETA,
                              **params)
    upstream = torch.rand(P, dtype=torch.float64)
    (grad,) = torch.autograd.grad((losses.double() * upstream).sum(), leaf)
    reference = lambda l, r: expected_losses(loss_type, l, r, lengths.double(), mask,  # noqa: E731
                                             scores if labels == "scores" else None, ranks, params)
    leaf64 = logps.double().requires_grad_()
    expected = reference(leaf64, ref.double())
    (grad64,) = torch.autograd.grad((expected * upstream).sum(), leaf64)
    assert losses.dtype == torch.float32 and losses.shape == (P,)
    assert relative_error(losses, expected, scale=loss_terms(reference, logps, ref)) <= VALUES
    # The gradient is a smooth function of s = β (logp - ref), known to a rounding of β (|logp| + |ref|):
    # an absolute error of s, which the gradient's exponentials turn into a relative one.
    logit_size = (BETA * (logps.abs() + ref.abs())).max().item()
    assert relative_error(grad, grad64) <= grad_tolerance(torch.float32, 2, K, K * K, logit_size)
    assert bool((grad[~mask] == 0).all()), "padded slots must get no gradient"
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("loss_type,params", CASES, ids=lambda c: str(c))
def test_float64_in_float64_out(loss_type, params):
    logps, ref, lengths, mask, scores, _ = make_lists(torch.float64)
    losses, metrics = listwise_loss(logps, ref, scores=scores, mask=mask, lengths=lengths, loss_type=loss_type,
                                    beta=BETA, **params)
    expected = expected_losses(loss_type, logps, ref, lengths, mask, scores, None, params)
    assert losses.dtype == torch.float64
    assert relative_error(losses, expected) <= 1e-12
    assert all(torch.isfinite(v) for v in metrics.values())


def pair_inputs():
    logps, ref, lengths, mask, _, _ = make_lists(sizes=[2] * 6, k=2)
    return logps, ref, lengths, torch.tensor([[1, 2]] * 6)


def pairwise(logps, ref, lengths, loss_type, **params):
    return pairwise_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], loss_type=loss_type, beta=BETA,
                         chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1], **params)


@pytest.mark.parametrize("loss_type,params", [("plackett_luce", {}), ("adpo", {"target": "hard"})])
def test_k2_equals_dpo_sigmoid(loss_type, params):
    logps, ref, lengths, ranks = pair_inputs()
    losses, metrics = listwise_loss(logps, ref, ranks=ranks, loss_type=loss_type, beta=BETA, **params)
    expected, expected_metrics = pairwise(logps, ref, lengths, "sigmoid")
    # Two fp32 computations from the same inputs, each within VALUES of float64 against the terms.
    terms = loss_terms(lambda l, r: pairwise(l, r, lengths.double(), "sigmoid")[0], logps, ref)
    assert relative_error(losses, expected, scale=terms) <= 2 * VALUES
    # Rewards and margins are differences of larger log-prob sums: their error is the sums'.
    reward_terms = BETA * (logps.abs() + ref.abs()).double().mean()
    for name, value in expected_metrics.items():
        scale = reward_terms if name.startswith("rewards/") else None
        assert relative_error(metrics[name], value, scale) <= 2 * VALUES, name


@pytest.mark.parametrize("pairwise_type", ["sigmoid", "hinge", "ipo", "nca_pair", "simpo", "orpo",
                                           ["sigmoid", "sft"]])
@pytest.mark.parametrize("loss_type", ["all_pairs", "dcg_pairwise"])
def test_k2_pair_modes_equal_the_pairwise_loss(loss_type, pairwise_type):
    logps, ref, lengths, ranks = pair_inputs()
    losses, _ = listwise_loss(logps, ref, ranks=ranks, lengths=lengths, loss_type=loss_type, beta=BETA,
                              pairwise_type=pairwise_type)
    expected, _ = pairwise(logps, ref, lengths, pairwise_type)
    terms = loss_terms(lambda l, r: pairwise(l, r, lengths.double(), pairwise_type)[0], logps, ref)
    assert relative_error(losses, expected, scale=terms) <= 2 * VALUES


def test_k2_list_ce_is_cdpo_with_soft_labels():
    logps, ref, lengths, _ = pair_inputs()
    scores = torch.randn(6, 2)
    losses, _ = listwise_loss(logps, ref, scores=scores, loss_type="list_ce", beta=BETA, target_temperature=0.5)
    probs = torch.sigmoid((scores[:, 0] - scores[:, 1]) / 0.5)
    expected, _ = pairwise(logps, ref, lengths, "sigmoid", preference_probs=probs)
    terms = loss_terms(lambda l, r: pairwise(l, r, lengths.double(), "sigmoid", preference_probs=probs)[0], logps, ref)
    assert relative_error(losses, expected, scale=terms) <= 2 * VALUES


def test_k2_pro_with_ranks_is_simpo_plus_sft():
    logps, ref, lengths, ranks = pair_inputs()
    losses, _ = listwise_loss(logps, ranks=ranks, lengths=lengths, loss_type="pro", pro_sft_weight=0.2)
    simpo, _ = pairwise(logps, ref, lengths, "simpo", simpo_gamma=0.0)

    def simpo_plus_sft(l, r):
        simpo = pairwise_loss(l[:, 0], l[:, 1], loss_type="simpo", beta=1.0, simpo_gamma=0.0,
                              chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1])[0]
        return simpo - 0.2 * l[:, 0] / lengths[:, 0]

    expected = simpo_plus_sft(logps, ref)
    assert relative_error(losses, expected, scale=loss_terms(simpo_plus_sft, logps, ref)) <= 2 * VALUES
    assert not torch.allclose(simpo, expected)  # beta is not PRO's: the test would catch a scaled score


@pytest.mark.parametrize("loss_type,params", CASES, ids=lambda c: str(c))
def test_invariant_to_storage_order(loss_type, params):
    logps, ref, lengths, mask, scores, ranks = make_lists()
    lists = torch.randperm(P)
    slots = torch.stack([torch.randperm(K) for _ in range(P)])
    shuffle = lambda x: x[lists][torch.arange(P)[:, None], slots]  # noqa: E731
    results = []
    for order in (lambda x: x, shuffle):
        leaf = order(logps).clone().requires_grad_()
        losses, metrics = listwise_loss(leaf, order(ref), ranks=order(ranks), mask=order(mask),
                                        lengths=order(lengths), loss_type=loss_type, beta=BETA, **params)
        losses.sum().backward()
        results.append((losses, leaf.grad, metrics))
    (base, base_grad, base_metrics), (moved, moved_grad, moved_metrics) = results
    assert torch.allclose(base[lists], moved, rtol=1e-6, atol=1e-6)
    assert torch.allclose(shuffle(base_grad), moved_grad, rtol=1e-5, atol=1e-7)
    for name in base_metrics:
        assert torch.allclose(base_metrics[name], moved_metrics[name], rtol=1e-5, atol=1e-6), name


def test_packed_form_equals_padded():
    logps, ref, lengths, mask, scores, _ = make_lists()
    padded, padded_metrics = listwise_loss(logps, ref, scores=scores, mask=mask, lengths=lengths, loss_type="pro")
    order = torch.randperm(int(mask.sum()))  # list ids in any storage order
    flat = lambda x: x[mask][order]  # noqa: E731
    list_ids = torch.arange(P)[:, None].expand(P, K)
    packed, packed_metrics = listwise_loss(flat(logps), flat(ref), scores=flat(scores), lengths=flat(lengths),
                                           list_ids=flat(list_ids), loss_type="pro")
    assert torch.allclose(padded, packed, rtol=1e-6)
    assert torch.allclose(padded_metrics["rewards/kendall_tau"], packed_metrics["rewards/kendall_tau"])


def test_lipo_lambda_is_the_unnormalised_dcg_pairwise_sigmoid():
    logps, ref, lengths, mask, scores, _ = make_lists(torch.float64)
    lipo, _ = listwise_loss(logps, ref, scores=scores, mask=mask, loss_type="lipo_lambda", beta=BETA)
    dcg, _ = listwise_loss(logps, ref, scores=scores, mask=mask, loss_type="dcg_pairwise", beta=BETA)
    psi = labels_of(scores, None, mask)
    totals = []
    for row in range(P):
        n = int(mask[row].sum())
        totals.append(sum(map(sum, lambda_weights(BETA * (logps[row, :n] - ref[row, :n]), psi[row]))))
        assert float(lipo[row]) == pytest.approx(float(dcg[row]) * totals[-1], rel=1e-12)
    assert max(abs(total - 1) for total in totals) > 0.1  # the normalisation is visible


def test_lipo_weights_are_not_zero_at_initialisation():
    logps, _, _, mask, scores, _ = make_lists()
    losses, _ = listwise_loss(logps, logps.detach(), scores=scores, mask=mask, loss_type="lipo_lambda")
    assert bool((losses > 0).all())


def test_top_1_plackett_luce_is_hard_adpo_without_ties():
    logps, ref, _, mask, scores, _ = make_lists()
    top1, _ = listwise_loss(logps, ref, scores=scores, mask=mask, loss_type="plackett_luce", top_k=1)
    adpo, _ = listwise_loss(logps, ref, scores=scores, mask=mask, loss_type="adpo")
    assert torch.allclose(top1, adpo, rtol=1e-6)


def test_metrics_on_a_hand_computed_list():
    logps = torch.tensor([[0.3, 0.1, 0.2, 0.0], [0.5, 0.9, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    _, m = listwise_loss(logps, torch.zeros(2, 4), scores=scores, mask=mask, beta=1.0)
    # list 0: pairs (0,1) C, (0,2) C, (1,2) D -> τ 1/3, 2 of 3 right, top-1 right; list 1: 1 pair, wrong.
    assert m["rewards/accuracies"].item() == pytest.approx(2 / 4)
    assert m["rewards/kendall_tau"].item() == pytest.approx((1 / 3 - 1) / 2)
    assert m["rewards/top1_accuracy"].item() == pytest.approx(0.5)
    assert m["rewards/chosen"].item() == pytest.approx((0.3 + 0.5) / 2)
    assert m["rewards/rejected"].item() == pytest.approx((0.2 + 0.9) / 2)
    assert m["rewards/mean"].item() == pytest.approx(2.0 / 5)


def test_all_tied_list_gives_no_pair_loss():
    logps, ref, _, mask, _, _ = make_lists(sizes=[3, 3], k=3)
    ranks = torch.tensor([[1, 1, 1], [1, 2, 3]])
    for loss_type in ("plackett_luce", "lipo_lambda", "all_pairs", "dcg_pairwise"):
        losses, _ = listwise_loss(logps, ref, ranks=ranks, loss_type=loss_type)
        assert losses[0] == 0 and losses[1] > 0, loss_type


BAD = [
    (dict(logps=torch.zeros(3, 1), scores=torch.zeros(3, 1)), "K >= 2"),
    (dict(mask=torch.tensor([[True, True], [True, False]])), "list 1 has 1 response"),
    (dict(scores=None, ranks=torch.tensor([[1, 2], [1, 3]])), "ranks of list 1 are not a \\(tied\\) ordering"),
    (dict(scores=None, ranks=torch.tensor([[1, 2], [2, 3]])), "ranks of list 1 are not a \\(tied\\) ordering"),
    (dict(scores=None, ranks=torch.tensor([[1.0, 2.0], [1.5, 1.0]])), "ranks of list 1 are not an ordering"),
    (dict(scores=torch.tensor([[1.0, 2.0], [float("nan"), 1.0]])), "scores of list 1 is nan"),
    (dict(scores=[[1.0, 2.0], [1.0]]), "scores\\[1\\] \\(list 1\\) has 1 entries.*pass mask"),
    (dict(logps=torch.tensor([[1.0, 2.0], [-float("inf"), 1.0]])), "logps of list 1 is -inf"),
    (dict(scores=torch.zeros(2, 3)), "scores must have the shape of logps"),
    (dict(scores=None), "exactly one of scores"),
    (dict(ranks=torch.tensor([[1, 2], [2, 1]])), "exactly one of scores"),
    (dict(ref_logps=None), "needs ref_logps"),
    (dict(loss_type="dcg_pairwise", pairwise_type="aot"), "sorts pairs across the batch"),
    (dict(loss_type="plackett_luce", label_smoothing=0.1), "apply to the pair-based loss types"),
    (dict(loss_type="pro"), "needs lengths"),
    (dict(loss_type="nope"), "unknown loss_type"),
    (dict(target="medium", loss_type="adpo"), "target must be"),
    (dict(top_k=0), "top_k must be"),
]


@pytest.mark.parametrize("override,message", BAD, ids=lambda x: str(x)[:60])
def test_bad_input_is_named(override, message):
    kwargs = dict(logps=torch.zeros(2, 2), ref_logps=torch.zeros(2, 2), scores=torch.tensor([[1.0, 0.0]] * 2))
    kwargs.update(override)
    with pytest.raises(ValueError, match=message):
        listwise_loss(kwargs.pop("logps"), kwargs.pop("ref_logps"), **kwargs)


def test_unknown_parameter_is_named():
    with pytest.raises(TypeError, match="unknown parameter"):
        listwise_loss(torch.zeros(2, 2), torch.zeros(2, 2), scores=torch.zeros(2, 2), temprature=1.0)


def test_every_loss_type_is_tested():
    assert {name for name, _ in CASES} == set(LISTWISE_LOSSES)


def test_curriculum_orders_easy_to_hard_with_curry_dpo_stages():
    scores = [[0.1, 0.9, 0.5, 0.2], [3.0, 1.0, 2.0]]
    pairs = curriculum_pairs(scores=scores, stages="rank")
    assert [(p.list_index, p.chosen_index, p.rejected_index, p.stage) for p in pairs] == [
        (0, 1, 0, 0),                 # rank distance 3: (1, 4)
        (1, 0, 1, 1), (0, 1, 3, 1),   # distance 2: larger gap first
        (1, 0, 2, 2), (0, 1, 2, 2),   # distance 1
    ]
    assert pairs[0].gap == pytest.approx(0.8)
    assert all(isinstance(p, CurriculumPair) for p in pairs)


def test_curriculum_all_pairs_count_stages_and_ties():
    ranks = torch.tensor([[1, 2, 2, 4], [2, 1, 0, 0]])
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    pairs = curriculum_pairs(ranks=ranks, mask=mask, pairing="all", stages=2)
    assert len(pairs) == 6  # 5 ordered pairs in list 0 (the tie gives none), 1 in list 1
    gaps = [p.gap for p in pairs]
    assert gaps == sorted(gaps, reverse=True)
    assert [p.stage for p in pairs] == [0, 0, 0, 1, 1, 1]
    assert (1, 1, 0) in [(p.list_index, p.chosen_index, p.rejected_index) for p in pairs]
    assert len(curriculum_pairs(ranks=ranks, mask=mask, pairing="all", min_gap=2)) == 3


def test_curriculum_bad_input():
    with pytest.raises(ValueError, match="list 1 has 1 response"):
        curriculum_pairs(scores=[[1.0, 2.0], [1.0]])
    with pytest.raises(ValueError, match="scores of list 0 is nan"):
        curriculum_pairs(scores=[[float("nan"), 2.0]])
    with pytest.raises(ValueError, match="stages"):
        curriculum_pairs(scores=[[1.0, 2.0]], stages=0)
    with pytest.raises(ValueError, match="not a \\(tied\\) ordering"):
        curriculum_pairs(ranks=[[1, 5]])


def test_metrics_are_finite_when_every_reward_ties():
    # At the first step the policy equals the reference: every implicit reward is 0.
    logps = torch.full((2, 3), -5.0)
    _, metrics = listwise_loss(logps, logps.clone(), scores=torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 2.0]]))
    assert all(torch.isfinite(value).all() for value in metrics.values())
    assert float(metrics["rewards/kendall_tau"]) == 0.0
