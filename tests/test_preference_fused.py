"""PreferenceLoss (fused, lean and budget) against the float64 reference pipeline:
materialised logits -> per-sequence sums -> the same pairwise_loss."""
import pytest
import torch

import prefops
from conftest import TOLERANCE, relative_error
from prefops.tools.compare import pairwise_reference_loss as reference_loss

PAIRS, LENGTH, HIDDEN, VOCAB = 3, 11, 21, 307


def make_batch(dtype=torch.float32):
    hidden = torch.randn(2 * PAIRS, LENGTH, HIDDEN, dtype=torch.float64).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, dtype=torch.float64) * 4 / HIDDEN**0.5).to(dtype)
    targets = torch.randint(0, VOCAB, (2 * PAIRS, LENGTH))
    targets[:, :2] = -100  # prompt
    for row in range(2 * PAIRS):  # padding of varying length
        targets[row, LENGTH - torch.randint(0, 4, ()).item():] = -100
    ref = torch.randn(2 * PAIRS, dtype=torch.float64) - 40
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
    module = prefops.PreferenceLoss(**case, strategy=strategy, budget=2 * LENGTH * VOCAB * 4)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = module(h, w, targets, ref_chosen_logps=ref[:PAIRS].float(), ref_rejected_logps=ref[PAIRS:].float())
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected, expected_metrics = reference_loss(h64, w64, targets, ref, **case)
    expected.backward()
    tolerance = TOLERANCE[dtype]
    assert relative_error(loss, expected) <= tolerance
    assert relative_error(h.grad, h64.grad) <= tolerance
    assert relative_error(w.grad, w64.grad) <= tolerance
    for name in ("rewards/chosen", "logps/chosen", "logps/rejected"):
        assert relative_error(metrics[name], expected_metrics[name]) <= tolerance, name
    reward_scale = expected_metrics["rewards/chosen"].abs() + expected_metrics["rewards/rejected"].abs()
    assert relative_error(metrics["rewards/margins"], expected_metrics["rewards/margins"], reward_scale) <= tolerance
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
