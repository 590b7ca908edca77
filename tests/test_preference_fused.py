"""PreferenceLoss (fused, lean and budget) against the float64 reference pipeline:
materialised logits -> per-sequence sums -> the same pairwise_loss."""
import pytest
import torch

import prefops
from conftest import assert_fused_loss_matches, relative_error
from prefops.tools.compare import pairwise_reference_loss as reference_loss
from prefops.chunks import budget_bytes_per_logit

PAIRS, LENGTH, HIDDEN, VOCAB = 3, 11, 21, 307
BETA = 0.1


def make_batch(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * PAIRS, LENGTH, HIDDEN, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) * 4 / HIDDEN**0.5).to(dtype)
    targets = torch.randint(0, VOCAB, (2 * PAIRS, LENGTH), generator=g)
    targets[:, :2] = -100  # prompt
    for row in range(2 * PAIRS):  # padding of varying length
        targets[row, LENGTH - torch.randint(0, 4, (), generator=g).item():] = -100
    ref = torch.randn(2 * PAIRS, generator=g, dtype=torch.float64) - 40
    return hidden, weight, targets, ref


CASES = [
    dict(loss_type="sigmoid"),
    dict(loss_type="ipo"),
    dict(loss_type="simpo"),
    dict(loss_type="orpo"),
    dict(loss_type="robust", label_smoothing=0.2),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    dict(loss_type="sigmoid", ld_alpha=0.5),
    dict(loss_type="sigmoid", wpo=True),
    dict(loss_type="sigmoid", wpo=True, ld_alpha=0.5),
    # Per-pair parameters: the budget strategy must hand each chunk its own pairs' values.
    dict(loss_type="sppo", preference_probs=torch.tensor([0.9, 0.6, 0.75], dtype=torch.float64)),
    dict(loss_type="modpo", modpo_weights=[0.6, 0.4], chosen_margin_rewards=torch.tensor([[1.0], [0.2], [-0.5]]),
         rejected_margin_rewards=torch.tensor([[0.1], [0.4], [-1.5]])),
]


@pytest.mark.parametrize("strategy", ["lean", "budget"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference(case, strategy, dtype):
    hidden, weight, targets, ref = make_batch(dtype)
    ref = ref.float()  # both sides read the same fp32 reference log-probs
    module = prefops.PreferenceLoss(**case, beta=BETA, strategy=strategy,
                                    budget=2 * LENGTH * VOCAB * budget_bytes_per_logit(dtype))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = module(h, w, targets, ref_chosen_logps=ref[:PAIRS], ref_rejected_logps=ref[PAIRS:])
    loss.backward()
    expected_metrics, values = assert_fused_loss_matches(
        loss, metrics, (h.grad, w.grad),
        lambda hid, wt: reference_loss(hid, wt, targets, ref.double(), beta=BETA, **case), hidden, weight, dtype,
        ("logps/chosen", "logps/rejected"))
    # Rewards and margins are differences of larger log-prob sums (or their means) and reference
    # values: their error is the sums', against the size of those terms.
    reward_terms = BETA * (expected_metrics["logps/chosen"].abs() + expected_metrics["logps/rejected"].abs()
                           + ref.double().abs().mean())
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert relative_error(metrics[name], expected_metrics[name], scale=reward_terms) <= values, name
    assert torch.allclose(metrics["rewards/accuracies"].double(), expected_metrics["rewards/accuracies"])


def test_reference_from_hidden_states_equals_precomputed():
    hidden, weight, targets, _ = make_batch()
    ref_hidden, ref_weight = hidden + 0.1 * torch.randn_like(hidden), weight * 0.9
    ref = prefops.sequence_sum(prefops.linear_logprobs(ref_hidden, ref_weight, targets), targets != -100)
    module = prefops.PreferenceLoss("sigmoid")
    from_hidden, _ = module(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=ref_weight)
    precomputed, _ = module(hidden, weight, targets, ref_chosen_logps=ref[:PAIRS], ref_rejected_logps=ref[PAIRS:])
    assert torch.allclose(from_hidden, precomputed, rtol=1e-6)


def test_packed_layout_equals_padded():
    hidden, weight, targets, ref = make_batch()
    module = prefops.PreferenceLoss("ipo", beta=0.3)
    padded, _ = module(hidden, weight, targets, ref_chosen_logps=ref[:PAIRS].float(),
                       ref_rejected_logps=ref[PAIRS:].float())
    keep = (targets != -100).reshape(-1)
    seq_ids = torch.arange(2 * PAIRS).repeat_interleave(LENGTH)[keep]
    packed, _ = module(hidden.reshape(-1, HIDDEN)[keep], weight, targets.reshape(-1)[keep], seq_ids=seq_ids,
                       ref_chosen_logps=ref[:PAIRS].float(), ref_rejected_logps=ref[PAIRS:].float())
    assert torch.allclose(padded, packed, rtol=1e-6)


def test_budget_too_small_falls_back_to_lean_with_a_warning():
    hidden, weight, targets, ref = make_batch()
    module = prefops.PreferenceLoss("sigmoid", strategy="budget", budget=VOCAB * 4)
    with pytest.warns(UserWarning, match="does not fit the memory budget"):
        module(hidden, weight, targets, ref_chosen_logps=ref[:PAIRS].float(), ref_rejected_logps=ref[PAIRS:].float())


def test_missing_reference_is_named():
    hidden, weight, targets, _ = make_batch()
    with pytest.raises(ValueError, match="needs the reference"):
        prefops.PreferenceLoss("sigmoid")(hidden, weight, targets)
    loss, _ = prefops.PreferenceLoss("simpo")(hidden, weight, targets)  # reference-free
    assert torch.isfinite(loss)


def test_odd_number_of_sequences_is_rejected():
    hidden, weight, targets, ref = make_batch()
    with pytest.raises(ValueError, match="even number of sequences"):
        prefops.PreferenceLoss("simpo")(hidden[:-1], weight, targets[:-1])


def test_batch_coupled_losses_run_lean_under_budget():
    hidden, weight, targets, ref = make_batch()
    refs = dict(ref_chosen_logps=ref[:PAIRS].float(), ref_rejected_logps=ref[PAIRS:].float())
    lean, _ = prefops.PreferenceLoss("aot", strategy="lean")(hidden, weight, targets, **refs)
    with pytest.warns(UserWarning, match="couples the pairs"):
        budget, _ = prefops.PreferenceLoss("aot", strategy="budget", budget=2 * LENGTH * VOCAB * 4)(
            hidden, weight, targets, **refs)
    assert torch.equal(lean, budget)


def _token_logps64(hidden, weight, targets):
    """float64 log p(target) [B, T] from materialised logits, 0 where the target is ignored."""
    logp = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    counted = targets != -100
    return torch.where(counted, logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0], 0.0), counted.double()


def _log_sigmoid(x):
    return -torch.log1p(torch.exp(-x))


@pytest.mark.parametrize("strategy", ["lean", "budget"])
def test_reference_free_combination_runs_without_reference(strategy):
    """SimPO + 0.5 NLL (neither reads the reference) from hidden states, against float64 formulas."""
    hidden, weight, targets, _ = make_batch()
    module = prefops.PreferenceLoss(["simpo", "sft"], beta=0.3, loss_weights=[1.0, 0.5], simpo_gamma=0.4,
                                    strategy=strategy, budget=2 * LENGTH * VOCAB * 4)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = module(h, w, targets)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    token, counted = _token_logps64(h64, w64, targets)
    sums, lengths = token.sum(1), counted.sum(1)
    mean = sums / lengths
    simpo = -_log_sigmoid(0.3 * (mean[:PAIRS] - mean[PAIRS:]) - 0.4)
    nll = -sums[:PAIRS].sum() / lengths[:PAIRS].sum()
    expected = simpo.mean() + 0.5 * nll
    expected.backward()
    assert relative_error(loss, expected) <= 1e-5
    assert relative_error(h.grad, h64.grad) <= 1e-5
    assert relative_error(w.grad, w64.grad) <= 1e-5


@pytest.mark.parametrize("loss_type", sorted(prefops.losses.REFERENCE_FREE))
def test_each_reference_free_loss_runs_without_reference(loss_type):
    hidden, weight, targets, ref = make_batch()
    module = prefops.PreferenceLoss(loss_type)
    without, _ = module(hidden, weight, targets)
    # A reference changes nothing for them: the same loss with one given.
    given, _ = module(hidden, weight, targets, ref_chosen_logps=ref[:PAIRS].float(),
                      ref_rejected_logps=ref[PAIRS:].float())
    assert torch.isfinite(without) and torch.equal(without, given)
    with pytest.raises(ValueError, match=r"loss_type \[.*'sigmoid'\] needs the reference: pass ref_chosen_logps"):
        prefops.PreferenceLoss([loss_type, "sigmoid"])(hidden, weight, targets)


def _orpo_expected(hidden, weight, targets, nll_targets, beta, orpo_nll, token_weights=None):
    """ORPO (arXiv:2403.07691) in float64: token-mean NLL of nll_targets over the chosen rows
    - β mean log σ(log odds ratio) on the mean token log-probs of targets (weighted by token_weights;
    the NLL of separate nll_targets is not)."""
    token, counted = _token_logps64(hidden, weight, targets)
    if token_weights is not None:
        token = token * token_weights
    mean = token.sum(1) / counted.sum(1)
    chosen, rejected = mean[:PAIRS], mean[PAIRS:]
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    loss = -beta * _log_sigmoid(log_odds).mean()
    if orpo_nll:
        nll_token, nll_counted = _token_logps64(hidden, weight, nll_targets)
        loss = loss - nll_token[:PAIRS].sum() / nll_counted[:PAIRS].sum()
    return loss


def _trl_nll_targets(targets, seed=5):
    """TRL's ORPO NLL labels: prompt and completion (here the prompt positions get token ids too);
    the rejected rows hold other ids, which must not be read."""
    g = torch.Generator().manual_seed(seed)
    nll_targets = targets.clone()
    nll_targets[:, :2] = torch.randint(0, VOCAB, (2 * PAIRS, 2), generator=g)
    nll_targets[PAIRS:] = torch.randint(0, VOCAB, (PAIRS, LENGTH), generator=g)
    return nll_targets


@pytest.mark.parametrize("strategy", ["lean", "budget"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("orpo_nll,nll_targets", [(True, True), (False, False), (True, False)],
                         ids=["nll_targets", "no_nll", "nll_on_targets"])
def test_orpo_nll_options_match_float64(strategy, packed, orpo_nll, nll_targets):
    hidden, weight, targets, _ = make_batch()
    given = _trl_nll_targets(targets) if nll_targets else None
    # With nll_targets, token weights on the preference log-probs must leave the separate NLL unweighted.
    weights = 0.5 + torch.rand(targets.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64) \
        if nll_targets else None
    module = prefops.PreferenceLoss("orpo", beta=0.25, orpo_nll=orpo_nll, strategy=strategy,
                                    budget=3 * LENGTH * VOCAB * 4)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    flat = lambda x: None if x is None else x.reshape(-1)  # noqa: E731
    if packed:
        seq_ids = torch.arange(2 * PAIRS).repeat_interleave(LENGTH)
        loss, metrics = module(h.reshape(-1, HIDDEN), w, targets.reshape(-1), seq_ids=seq_ids,
                               nll_targets=flat(given), token_weights=flat(weights))
    else:
        loss, metrics = module(h, w, targets, nll_targets=given, token_weights=weights)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected = _orpo_expected(h64, w64, targets, targets if given is None else given, 0.25, orpo_nll, weights)
    expected.backward()
    assert relative_error(loss, expected) <= 1e-5
    assert relative_error(h.grad, h64.grad) <= 1e-5
    assert relative_error(w.grad, w64.grad) <= 1e-5
    assert ("nll_loss" in metrics) == orpo_nll
    if orpo_nll:
        nll = _orpo_expected(hidden, weight, targets, targets if given is None else given, 0.25, True, weights) - \
            _orpo_expected(hidden, weight, targets, None, 0.25, False, weights)
        assert relative_error(metrics["nll_loss"], nll) <= 1e-5


def test_nll_targets_bad_input():
    hidden, weight, targets, ref = make_batch()
    nll_targets = _trl_nll_targets(targets)
    with pytest.raises(ValueError, match="nll_targets is given but loss_type 'sigmoid' has no NLL term"):
        prefops.PreferenceLoss("sigmoid")(hidden, weight, targets, nll_targets=nll_targets,
                                          ref_chosen_logps=ref[:PAIRS], ref_rejected_logps=ref[PAIRS:])
    with pytest.raises(ValueError, match="has no NLL term"):
        prefops.PreferenceLoss("orpo", orpo_nll=False)(hidden, weight, targets, nll_targets=nll_targets)
    with pytest.raises(ValueError, match="nll_targets must be an integer tensor of the shape of targets"):
        prefops.PreferenceLoss("orpo")(hidden, weight, targets, nll_targets=nll_targets[:, 1:])
    with pytest.raises(ValueError, match="nll_targets must be an integer tensor"):
        prefops.PreferenceLoss("orpo")(hidden, weight, targets, nll_targets=nll_targets.float())
    with pytest.raises(ValueError, match="nll_targets"):
        prefops.PreferenceLoss("orpo")(hidden, weight, targets, nll_targets=nll_targets + VOCAB)
    with pytest.raises(ValueError, match="nll_targets is not available for the TDPO losses"):
        prefops.PreferenceLoss("tdpo1")(hidden, weight, targets, nll_targets=nll_targets)
    with pytest.raises(ValueError, match="pass nll_targets to forward"):
        prefops.PreferenceLoss("orpo", chosen_nll_logps=ref[:PAIRS])
    with pytest.raises(ValueError, match="orpo_nll must be True or False"):
        prefops.PreferenceLoss("orpo", orpo_nll=0)(hidden, weight, targets)
