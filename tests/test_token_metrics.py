"""TRL's token metrics from the fused pass: the per-token mean logit (sum_v z_v / V) and top-1
(target logit >= every logit), on both backends (Triton under the interpreter on CPU), under
the lean and budget strategies, and PreferenceLoss(token_metrics=True) against float64
references on materialised logits."""
import pytest
import torch

import prefops
from conftest import relative_error, value_tolerance
from helpers import make_inputs
from prefops.ops import linear_logprobs_forward, token_outputs
from prefops.preference import trl_token_metrics
from prefops.reference.logprobs import logits as reference_logits
from prefops.chunks import budget_bytes_per_logit

TRANSFORMS = [{}, {"temperature": 0.7}, {"softcap": 15.0}]
PAIRS, LENGTH, HIDDEN, VOCAB = 3, 9, 19, 331


def reference_stats(hidden, weight, targets, bias=None, **transform):
    """Float64 (entropy, mean logit, top1) per token from the materialised logits; 0 / False at ignored tokens."""
    up = lambda x: None if x is None else x.double()  # noqa: E731
    entropy, mean_logit, top1 = prefops.reference.token_metrics(up(hidden), up(weight), targets, bias=up(bias),
                                                                **transform)
    # The mean logit's error is set by the size of the logits it averages, not by the mean itself.
    scale = reference_logits(up(hidden), up(weight), bias=up(bias), **transform).abs().mean(-1)
    return entropy, mean_logit, top1, torch.where(targets != -100, scale, 0.0)


def within_fp32_error_of_the_max(hidden, weight, targets, bias, tolerance, **transform):
    """Tokens whose target logit lies within the logits' fp32 error of its row's maximum (float64):
    there fp32 arithmetic may tie them or not, and top-1 may go either way."""
    up = lambda x: None if x is None else x.double()  # noqa: E731
    z = reference_logits(up(hidden), up(weight), bias=up(bias), **transform)
    gap = z.max(-1).values - z.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    return (targets != -100) & (gap <= tolerance * z.abs().amax(-1))


def targets_on_argmax(hidden, weight, targets, bias=None, **transform):
    """Every other counted target moved onto its row's argmax, so top-1 is neither all False nor all True."""
    up = lambda x: None if x is None else x.double()  # noqa: E731
    best = reference_logits(up(hidden), up(weight), bias=up(bias), **transform).argmax(-1)
    moved = targets.clone()
    moved[1::2] = torch.where(targets[1::2] != -100, best[1::2], -100)
    return moved


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("transform", TRANSFORMS, ids=str)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 4.0), (torch.float32, 300.0), (torch.bfloat16, 4.0)])
def test_token_outputs_match_float64(backend, transform, dtype, scale):
    hidden, weight, targets, bias = make_inputs(37, HIDDEN, VOCAB, dtype=dtype, scale=scale, bias=True)
    targets = targets_on_argmax(hidden, weight, targets, bias, **transform)
    logp, lse, entropy, sum_p2, mean_logit, top1 = token_outputs(hidden, weight, targets, bias=bias, backend=backend,
                                                                 **transform)
    want_entropy, want_mean, want_top1, size = reference_stats(hidden, weight, targets, bias, **transform)
    assert mean_logit.dtype == torch.float32 and top1.dtype == torch.bool
    tolerance = value_tolerance(HIDDEN, VOCAB)
    assert relative_error(mean_logit, want_mean, scale=size) <= tolerance
    # At |z| ~ 300 the entropy is ~0: it carries the logits' absolute error.
    assert relative_error(entropy, want_entropy, scale=size if scale > 100 else None) <= tolerance
    assert 0 < int(want_top1.sum()) < int((targets != -100).sum())
    # A saturated softcap gives fp32 ties at the cap (tanh rounds to 1), which count as top-1, where
    # float64 still tells the logits apart. Whether a logit reaches the cap exactly depends on the
    # order of its fp32 sums (the GEMM's blocking, the kernel's tanh): 1 run in 17 disagreed with one
    # fixed fp32 order. Away from such near-ties top-1 must be float64's.
    near_tie = within_fp32_error_of_the_max(hidden, weight, targets, bias, tolerance, **transform)
    assert torch.equal(top1[~near_tie], want_top1[~near_tie])
    if not ("softcap" in transform and scale > 100):
        assert torch.equal(top1, want_top1)
    assert not (mean_logit.requires_grad or top1.requires_grad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_tie_counts_as_top1(backend):
    hidden, weight, targets, _ = make_inputs(6, HIDDEN, VOCAB, ignore_every=0)
    best = reference_logits(hidden.double(), weight.double()).argmax(-1)
    tied = weight.clone()
    tied[VOCAB - 1] = weight[best[0]]  # an exact copy of row 0's best: the same logit
    targets[0] = VOCAB - 1  # the tied id above the argmax TRL's first-index rule would pick
    _, _, _, _, _, top1 = token_outputs(hidden, tied, targets, backend=backend)
    assert bool(top1[0])


def test_extra_outputs_save_nothing_for_backward():
    hidden, weight, targets, _ = make_inputs(12, HIDDEN, VOCAB)
    hidden.requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        token_outputs(hidden, weight, targets)
    # hidden, weight, targets, lse and entropy: nothing per token beyond those two.
    assert sorted(saved) == sorted([hidden.numel(), weight.numel(), 12, 12, 12])


@pytest.mark.parametrize("extras", [[True, True, True], [False, False, False], [True, False, True]], ids=str)
@pytest.mark.parametrize("sliced", [False, True], ids=["lean", "sliced"])
def test_custom_op_schema_and_fake_agree(extras, sliced):
    hidden, weight, targets, bias = make_inputs(10, HIDDEN, VOCAB, bias=True)
    torch.library.opcheck(linear_logprobs_forward, (hidden.requires_grad_(), weight, bias, targets, -100, 1.0, None,
                                                    "torch", 1 << 20, sliced, extras))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("extras", [(), ("entropy",), ("sum_p2",), ("mean_logit",), ("entropy", "mean_logit")],
                         ids=str)
def test_extras_left_out_are_none_and_change_nothing_else(backend, extras):
    """The Triton kernel compiles an unrequested accumulator away; what is asked for must not move."""
    hidden, weight, targets, bias = make_inputs(37, HIDDEN, VOCAB, scale=4.0, bias=True)
    targets = targets_on_argmax(hidden, weight, targets, bias)
    full = token_outputs(hidden, weight, targets, bias=bias, backend=backend)
    some = token_outputs(hidden, weight, targets, bias=bias, backend=backend, extras=extras)
    for name, got, want in zip(("logp", "lse", "entropy", "sum_p2", "mean_logit", "top1"), some, full):
        if name in ("entropy", "sum_p2", "mean_logit") and name not in extras:
            assert got is None, name
        else:
            assert torch.equal(got, want), name


def test_an_entropy_not_asked_for_takes_no_gradient():
    hidden, weight, targets, _ = make_inputs(12, HIDDEN, VOCAB)
    hidden.requires_grad_()
    _, _, entropy, _, _, _ = token_outputs(hidden, weight, targets, extras=("entropy",))
    assert entropy.requires_grad
    out = linear_logprobs_forward(hidden, weight, None, targets, -100, 1.0, None, "torch", 1 << 20, True,
                                  [False, True, True])
    assert not out[2].requires_grad and torch.equal(out[2], torch.zeros_like(out[2]))


def test_unknown_extra_is_refused():
    hidden, weight, targets, _ = make_inputs(4, HIDDEN, VOCAB)
    with pytest.raises(ValueError, match="extras entry"):
        token_outputs(hidden, weight, targets, extras=("entropy", "kl"))


def batch(dtype, scale, layout, empty_rejected=False):
    hidden, weight, targets, bias = make_inputs(2 * PAIRS * LENGTH, HIDDEN, VOCAB, dtype=dtype, scale=scale,
                                                bias=True, ignore_every=3)
    targets = targets_on_argmax(hidden, weight, targets, bias)
    hidden, targets = hidden.view(2 * PAIRS, LENGTH, HIDDEN), targets.view(2 * PAIRS, LENGTH)
    if empty_rejected:  # a sequence with no counted token (the pairwise losses refuse one)
        targets[PAIRS + 1] = -100
    seq_ids = None
    if layout == "packed":  # flat tokens; one sequence id per row, the last row shuffled to the front
        order = torch.cat([torch.tensor([2 * PAIRS - 1]), torch.arange(2 * PAIRS - 1)])
        seq_ids = order[:, None].expand(-1, LENGTH).reshape(-1)
        hidden, targets = hidden[order].reshape(-1, HIDDEN), targets[order].reshape(-1)
    return hidden, weight, targets, bias, seq_ids


def per_sequence(values, targets, seq_ids):
    if seq_ids is None:
        return values.double().sum(-1)
    return torch.zeros(2 * PAIRS, dtype=torch.float64).index_add(0, seq_ids, values.double())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("strategy", ["lean", "budget"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_sequence_objective_stats_match_float64(backend, strategy, layout):
    hidden, weight, targets, bias, seq_ids = batch(torch.float32, 50.0, layout, empty_rejected=True)
    groups = torch.stack([torch.arange(PAIRS), torch.arange(PAIRS) + PAIRS], 1)
    head = lambda logps, group_index, stats: (logps[:, 0] - logps[:, 1]).sum()  # noqa: E731
    options = dict(head=head, groups=groups, seq_ids=seq_ids, bias=bias, softcap=30.0, strategy=strategy,
                   budget=2 * LENGTH * VOCAB * 4, backend=backend)
    hidden.requires_grad_()
    out = prefops.sequence_objective(hidden, weight, targets, stats=("entropy", "mean_logit", "top1"), **options)
    plain = prefops.sequence_objective(hidden, weight, targets, **options)
    entropy, mean_logit, top1, size = reference_stats(hidden.detach(), weight, targets, bias, softcap=30.0)
    tolerance = value_tolerance(HIDDEN, VOCAB, LENGTH)
    assert relative_error(out.stats["entropy"], per_sequence(entropy, targets, seq_ids)) <= tolerance
    assert relative_error(out.stats["mean_logit"], per_sequence(mean_logit, targets, seq_ids),
                          scale=per_sequence(size, targets, seq_ids)) <= tolerance
    assert torch.equal(out.stats["top1"], per_sequence(top1, targets, seq_ids).float())
    assert float(out.stats["top1"].sum()) > 0
    # Asking for the statistics changes neither the loss nor its gradient.
    grad, plain_grad = (torch.autograd.grad(o.loss, hidden)[0] for o in (out, plain))
    assert torch.equal(out.loss, plain.loss) and torch.equal(grad, plain_grad)


def reference_metrics(hidden, weight, targets, bias, seq_ids):
    """TRL's definitions on materialised float64 logits: token sums over the batch / token counts."""
    """Also returns the scale each metric's error is measured against: a mean logit averages logits
    of both signs to near 0, so its fp32 error is set by the size of the logits (mean |z|), not by itself."""
    entropy, mean_logit, top1, logit_size = reference_stats(hidden, weight, targets, bias)
    counted = targets != -100
    sums = {name: per_sequence(value, targets, seq_ids)
            for name, value in (("entropy", entropy), ("mean_logit", mean_logit), ("top1", top1),
                                ("count", counted), ("logit_size", logit_size))}
    chosen, rejected = slice(0, PAIRS), slice(PAIRS, 2 * PAIRS)
    mean = lambda name, part: sums[name][part].sum() / sums["count"][part].sum()  # noqa: E731
    everything = slice(0, 2 * PAIRS)
    return {"entropy": (mean("entropy", everything), None),
            "logits/chosen": (mean("mean_logit", chosen), mean("logit_size", chosen)),
            "logits/rejected": (mean("mean_logit", rejected), mean("logit_size", rejected)),
            "mean_token_accuracy": (mean("top1", chosen), None)}


@pytest.mark.parametrize("strategy,backend", [("lean", "torch"), ("budget", "torch"), ("lean", "triton"),
                                              ("budget", "triton")])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preference_loss_token_metrics_match_reference(strategy, backend, layout, dtype):
    hidden, weight, targets, bias, seq_ids = batch(dtype, 8.0, layout)
    ref = torch.randn(2, PAIRS)
    options = dict(bias=bias, seq_ids=seq_ids, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1])
    budget = 2 * LENGTH * VOCAB * budget_bytes_per_logit(dtype)
    with prefops.settings(backend=backend):
        loss, metrics = prefops.PreferenceLoss("sigmoid", beta=0.1, token_metrics=True, strategy=strategy,
                                               budget=budget)(hidden, weight, targets, **options)
        plain_loss, plain_metrics = prefops.PreferenceLoss("sigmoid", beta=0.1, strategy=strategy,
                                                           budget=budget)(hidden, weight, targets, **options)
    expected = reference_metrics(hidden, weight, targets, bias, seq_ids)
    tolerance = value_tolerance(HIDDEN, VOCAB, 2 * PAIRS * LENGTH)  # fp32 arithmetic whatever the input dtype
    for name, (want, scale) in expected.items():
        assert relative_error(metrics[name], want, scale) <= tolerance, name
    assert 0 < float(metrics["mean_token_accuracy"]) < 1
    assert torch.equal(loss, plain_loss)
    assert set(metrics) - set(plain_metrics) == set(expected)


def test_no_tokens_gives_zero_like_trl():
    count = torch.tensor([[0.0, 4.0], [0.0, 2.0]])  # no chosen completion token in the batch
    stats = {"count": count, "entropy": torch.tensor([[0.0, 3.0], [0.0, 1.0]]),
             "mean_logit": torch.tensor([[0.0, -2.0], [0.0, 0.5]]), "top1": torch.zeros(2, 2)}
    metrics = trl_token_metrics(stats)
    assert float(metrics["logits/chosen"]) == 0.0 and float(metrics["mean_token_accuracy"]) == 0.0
    assert float(metrics["logits/rejected"]) == -0.25 and float(metrics["entropy"]) == pytest.approx(4.0 / 6.0)


def test_token_metrics_refuse_the_tdpo_losses():
    with pytest.raises(ValueError, match="token_metrics"):
        prefops.PreferenceLoss("tdpo1", token_metrics=True)
