"""ListwiseLoss (fused, lean and budget) against the float64 reference pipeline:
materialised logits -> per-sequence sums -> the same listwise_loss."""
import pytest
import torch

import prefops
from conftest import assert_fused_loss_matches, loss_reference64, relative_error, value_tolerance
from prefops.listwise import ListwiseLoss
from prefops.losses.listwise import listwise_loss
from prefops.memory import AllocationRecorder
from prefops.tools.compare import pairwise_reference_loss
from prefops.chunks import budget_bytes_per_logit

LENGTH, HIDDEN, VOCAB = 11, 21, 307
# Three lists of 4, 2 and 3 responses stored in a scrambled order; slot -1 is empty.
LISTS = torch.tensor([[3, 0, 7, 5], [8, 1, -1, -1], [2, 6, 4, -1]])
SEQUENCES = 9
BETA = 0.1  # ListwiseLoss's default


def make_batch(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(SEQUENCES, LENGTH, HIDDEN, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) * 4 / HIDDEN**0.5).to(dtype)
    targets = torch.randint(0, VOCAB, (SEQUENCES, LENGTH), generator=g)
    targets[:, :2] = -100  # prompt
    for row in range(SEQUENCES):  # padding of varying length
        targets[row, LENGTH - torch.randint(0, 4, (), generator=g).item():] = -100
    ref = torch.randn(SEQUENCES, generator=g, dtype=torch.float64) - 40
    scores = torch.randn(LISTS.shape, generator=g, dtype=torch.float64)
    return hidden, weight, targets, ref, scores


def reference_loss(hidden, weight, targets, ref, scores, *, loss_type, **params):
    token = prefops.reference.linear_logprobs(hidden, weight, targets)
    counted = targets != -100
    sums, lengths = (token * counted).sum(1), counted.sum(1).double()
    mask = LISTS >= 0
    gather = lambda x: torch.where(mask, x[LISTS.clamp_min(0)], 0.0)  # noqa: E731
    losses, metrics = listwise_loss(gather(sums), gather(ref), scores=scores, mask=mask, lengths=gather(lengths),
                                    loss_type=loss_type, **params)
    return losses.mean(), metrics


CASES = [
    dict(loss_type="plackett_luce"),
    dict(loss_type="lipo_lambda", beta=0.3),
    dict(loss_type="pro"),
    dict(loss_type="adpo", target="soft"),
    dict(loss_type="list_ce"),
    dict(loss_type="all_pairs", pairwise_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    dict(loss_type="dcg_pairwise", pairwise_type="ipo"),
    dict(loss_type="sppo_response", beta=0.5),
    dict(loss_type="spo"),
]


@pytest.mark.parametrize("strategy", ["lean", "budget"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference(case, strategy, dtype):
    hidden, weight, targets, ref, scores = make_batch(dtype)
    ref, scores = ref.float(), scores.float()  # both sides read the same fp32 values
    # A budget of about one list's logits: the lists are evaluated in several chunks.
    module = ListwiseLoss(**case, strategy=strategy, budget=4 * LENGTH * VOCAB * budget_bytes_per_logit(dtype))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = module(h, w, targets, lists=LISTS, scores=scores, ref_logps=ref)
    loss.backward()
    expected_metrics, values = assert_fused_loss_matches(
        loss, metrics, (h.grad, w.grad),
        lambda hid, wt: reference_loss(hid, wt, targets, ref.double(), scores.double(), **case), hidden, weight,
        dtype, ("logps/chosen", "logps/mean"))
    assert h.grad[1].abs().sum() > 0
    # A reward is β (log-prob sum - reference), a difference of larger terms: its error is the sum's.
    reward_terms = case.get("beta", BETA) * (expected_metrics["logps/mean"].abs() + ref.double().abs().mean())
    for name in ("rewards/chosen", "rewards/mean"):
        assert relative_error(metrics[name], expected_metrics[name], scale=reward_terms) <= values, name
    # Counts of correctly ordered pairs: exact, as no two rewards of this batch are within the fp32 error.
    for name in ("rewards/accuracies", "rewards/kendall_tau", "rewards/top1_accuracy"):
        assert torch.allclose(metrics[name].double(), expected_metrics[name]), name


def test_reference_from_hidden_states_equals_precomputed():
    hidden, weight, targets, _, scores = make_batch()
    ref_hidden, ref_weight = hidden + 0.1 * torch.randn_like(hidden), weight * 0.9
    ref = prefops.sequence_sum(prefops.linear_logprobs(ref_hidden, ref_weight, targets), targets != -100)
    module = ListwiseLoss("lipo_lambda")
    from_hidden, _ = module(hidden, weight, targets, lists=LISTS, scores=scores, ref_hidden=ref_hidden,
                            ref_weight=ref_weight)
    precomputed, _ = module(hidden, weight, targets, lists=LISTS, scores=scores, ref_logps=ref)
    assert torch.allclose(from_hidden, precomputed, rtol=1e-6)


def test_packed_layout_equals_padded():
    hidden, weight, targets, ref, scores = make_batch()
    module = ListwiseLoss("plackett_luce", beta=0.3)
    padded, _ = module(hidden, weight, targets, lists=LISTS, scores=scores, ref_logps=ref.float())
    keep = (targets != -100).reshape(-1)
    seq_ids = torch.arange(SEQUENCES).repeat_interleave(LENGTH)[keep]
    packed, _ = module(hidden.reshape(-1, HIDDEN)[keep], weight, targets.reshape(-1)[keep], seq_ids=seq_ids,
                       lists=LISTS, scores=scores, ref_logps=ref.float())
    assert torch.allclose(padded, packed, rtol=1e-6)


def test_default_layout_is_list_major():
    hidden, weight, targets, ref, _ = make_batch()
    hidden, targets, ref = hidden[:8], targets[:8], ref[:8]
    ranks = torch.tensor([[1, 2, 3, 4], [2, 1, 1, 3]])
    module = ListwiseLoss("adpo")
    default, _ = module(hidden, weight, targets, ranks=ranks, ref_logps=ref)
    explicit, _ = module(hidden, weight, targets, lists=torch.arange(8).view(2, 4), ranks=ranks, ref_logps=ref)
    assert torch.equal(default, explicit)


@pytest.mark.parametrize("strategy", ["lean", "budget"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", ["sigmoid", "sft"]])
def test_k2_equals_preference_loss(loss_type, strategy):
    hidden, weight, targets, ref, _ = make_batch()
    hidden, targets, ref = hidden[:8], targets[:8], ref[:8].float()
    pairs = torch.stack([torch.arange(4), torch.arange(4) + 4], 1)  # PreferenceLoss's [chosen; rejected]
    options = dict(strategy=strategy, budget=2 * LENGTH * VOCAB * 4)
    pairwise, pairwise_metrics = prefops.PreferenceLoss(loss_type, beta=0.2, **options)(
        hidden, weight, targets, ref_chosen_logps=ref[:4], ref_rejected_logps=ref[4:])
    listwise_type = "plackett_luce" if loss_type == "sigmoid" else "all_pairs"
    params = {} if loss_type == "sigmoid" else {"pairwise_type": loss_type}
    listwise, metrics = ListwiseLoss(listwise_type, beta=0.2, **options, **params)(
        hidden, weight, targets, lists=pairs, ranks=torch.tensor([[0, 1]] * 4), ref_logps=ref)
    # Two fp32 computations, each within the value tolerance of the float64 pairwise loss.
    _, expected_metrics, _, _, _, loss_scale = loss_reference64(
        lambda hid, wt: pairwise_reference_loss(hid, wt, targets, ref.double(), loss_type=loss_type, beta=0.2),
        hidden, weight)
    values = 2 * value_tolerance(HIDDEN, VOCAB, targets.numel())
    assert relative_error(listwise, pairwise, scale=loss_scale) <= values
    reward_terms = 0.2 * (expected_metrics["logps/chosen"].abs() + expected_metrics["logps/rejected"].abs()
                          + ref.double().abs().mean())
    for name in ("rewards/chosen", "rewards/rejected"):
        assert relative_error(metrics[name], pairwise_metrics[name], scale=reward_terms) <= values, name
    assert relative_error(metrics["logps/chosen"], pairwise_metrics["logps/chosen"]) <= values
    assert torch.equal(metrics["rewards/accuracies"], pairwise_metrics["rewards/accuracies"])


def test_lean_allocates_no_logits_sized_tensor():
    hidden, weight, targets, ref, scores = make_batch()
    hidden.requires_grad_()
    weight.requires_grad_()
    recorder = AllocationRecorder()
    with recorder, prefops.settings(workspace=64 * 1024):
        loss, _ = ListwiseLoss("lipo_lambda", strategy="lean")(hidden, weight, targets, lists=LISTS, scores=scores,
                                                               ref_logps=ref)
        loss.backward()
    counted = int((targets != -100).sum())
    assert recorder.sizes, "the recorder saw nothing: the test would pass vacuously"
    biggest_bytes, biggest_numel, where = max(recorder.sizes)
    assert biggest_numel < counted * VOCAB, f"{where} allocated {biggest_numel} elements"


BAD = [
    (dict(lists=torch.tensor([[0, 1], [1, 2]]), scores=torch.zeros(2, 2)), "more than one list slot"),
    (dict(lists=torch.tensor([[0, 9]]), scores=torch.zeros(1, 2)), "lists entries must be"),
    (dict(lists=LISTS, scores=torch.zeros(2, 2)), "shape of lists"),
    (dict(scores=torch.zeros(2, 4)), "list-major"),
    (dict(lists=LISTS), "exactly one of scores"),
    (dict(lists=LISTS, scores=torch.randn(3, 4), ref_logps=None), "needs ref_logps"),
    (dict(lists=LISTS, scores=torch.randn(3, 4), ref_logps=torch.zeros(4)), "ref_logps must have shape"),
    (dict(lists=torch.tensor([[0, 1, 2], [3, -1, -1]]), scores=torch.randn(2, 3)), "list 1 has 1 response"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=lambda x: str(x)[:50])
def test_bad_input_is_named(kwargs, message):
    hidden, weight, targets, ref, _ = make_batch()
    kwargs = {"ref_logps": ref, **kwargs}
    with pytest.raises(ValueError, match=message):
        ListwiseLoss("plackett_luce")(hidden, weight, targets, **kwargs)
