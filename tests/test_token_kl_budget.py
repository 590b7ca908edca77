"""The budget strategy of the per-token KL (TDPO): PreferenceLoss('tdpo1'/'tdpo2', strategy='budget')
against the lean strategy and the float64 pipeline on materialised logits (loss, dh, dW, metrics),
both KL directions and backends (the rows_kl kernels under the interpreter on CPU), several chunks;
the row kernels against the tile math; memory within the budget; the fallback to lean."""
import warnings

import pytest
import torch

import prefops
from conftest import grad_tolerance, relative_error, value_tolerance
from helpers import kl64, linear_grads64, token_kl_loss, token_values64, transform64
from prefops.losses import pairwise_loss
from prefops.memory import AllocationRecorder
from prefops.reference.token_kl import linear_token_kl as reference_token_kl
from prefops.kernels.config import forced
from prefops.chunks import budget_bytes_per_logit
from prefops.token_kl import finalize_kl, rows_kl_grads, rows_kl_stats, sequence_kl_objective

PAIRS, LENGTH, HIDDEN, REF_HIDDEN, VOCAB = 3, 9, 23, 19, 331
TOKENS = 2 * PAIRS * LENGTH
BETA, ALPHA = 0.3, 0.7
# Losses and metrics: fp32 sums over tokens of fp32 token values of both models' logits.
VALUES = value_tolerance(HIDDEN, REF_HIDDEN, VOCAB, TOKENS)


def one_pair(dtype):
    """A budget that holds one pair's policy and reference logits (fp32) and gradient tile: three chunks."""
    return (2 * LENGTH) * VOCAB * budget_bytes_per_logit(dtype, sides=2)


def make_batch(dtype, *, scale=4.0, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, s=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * s  # noqa: E731
    batch = {"hidden": rand(2 * PAIRS, LENGTH, HIDDEN), "weight": rand(VOCAB, HIDDEN, s=scale / HIDDEN**0.5),
             "ref_hidden": rand(2 * PAIRS, LENGTH, REF_HIDDEN),
             "ref_weight": rand(VOCAB, REF_HIDDEN, s=scale / REF_HIDDEN**0.5),
             "bias": rand(VOCAB) if bias else None, "ref_bias": rand(VOCAB) if bias else None}
    batch = {k: None if v is None else v.to(dtype) for k, v in batch.items()}
    targets = torch.randint(0, VOCAB, (2 * PAIRS, LENGTH), generator=g)
    targets[:, :2] = -100
    for row in range(2 * PAIRS):  # uneven lengths
        targets[row, LENGTH - int(torch.randint(0, 4, (), generator=g)):] = -100
    batch["targets"] = targets
    return batch


def fused_run(batch, loss_type, direction, **options):
    module = prefops.PreferenceLoss(loss_type, beta=BETA, tdpo_alpha=ALPHA, kl_direction=direction, **options)
    h, w = batch["hidden"].clone().requires_grad_(), batch["weight"].clone().requires_grad_()
    b = None if batch["bias"] is None else batch["bias"].clone().requires_grad_()
    loss, metrics = module(h, w, batch["targets"], bias=b, ref_hidden=batch["ref_hidden"],
                           ref_weight=batch["ref_weight"], ref_bias=batch["ref_bias"])
    loss.backward()
    return loss.detach(), [h.grad, w.grad] + ([b.grad] if b is not None else []), metrics


def reference_run(batch, loss_type, direction, **transform):
    """Float64 from the definitions (tests/helpers.py): materialised logits -> per-token KL and
    log-probs -> sums -> pairwise_loss. Returns the loss, gradients and metrics, the gradients'
    magnitudes and max |z|."""
    flat = lambda x: None if x is None else x.reshape(-1, x.shape[-1])  # noqa: E731
    targets = batch["targets"].reshape(-1)
    ref_linear = flat(batch["ref_hidden"]).double() @ batch["ref_weight"].double().t()
    if batch["ref_bias"] is not None:
        ref_linear = ref_linear + batch["ref_bias"].double()
    tokens = token_kl_loss(transform64(ref_linear, **transform), targets, targets != -100, direction == "policy_ref",
                           (0.0, 0.0))
    pair = lambda x: x.view(2 * PAIRS, LENGTH).sum(1).view(2, PAIRS)  # noqa: E731

    def loss(z):
        kl, logp, ref_logp = tokens(z)[1]
        (cw, cl), (rw, rl), (kw, kr) = pair(logp), pair(ref_logp), pair(kl)
        (nc, nr) = pair((targets != -100).double())
        losses, metrics = pairwise_loss(cw, cl, rw, rl, loss_type=loss_type, beta=BETA, chosen_lengths=nc,
                                        rejected_lengths=nr, chosen_seq_kl=kw, rejected_seq_kl=kr, tdpo_alpha=ALPHA)
        return losses.mean(), (losses.mean(), metrics)

    (value, metrics), grads, sizes, logit_size = linear_grads64(flat(batch["hidden"]), batch["weight"], batch["bias"],
                                                                loss, **transform)
    grads[0], sizes[0] = grads[0].view(batch["hidden"].shape), sizes[0].view(batch["hidden"].shape)
    return value, grads, metrics, sizes, logit_size


def strict():
    """No silent fallback to lean: any UserWarning fails the test."""
    catcher = warnings.catch_warnings()
    catcher.__enter__()
    warnings.simplefilter("error", UserWarning)
    return catcher


def check_close(actual, expected, dtype, sizes, logit_size):
    """Loss and metrics at the value tolerance, gradients at the gradient tolerance against
    `sizes`, the magnitudes of their terms (reference_run's)."""
    loss, grads, metrics = actual
    want_loss, want_grads, want_metrics = expected[:3]
    assert relative_error(loss, want_loss) <= VALUES
    limit = grad_tolerance(dtype, HIDDEN, VOCAB, TOKENS, logit_size)
    for name, grad, want, size in zip(("hidden", "weight", "bias"), grads, want_grads, sizes):
        assert relative_error(grad, want, scale=size) <= limit, f"grad of {name}"
    # A reward is a difference of log-prob sums: its error is the sums'.
    for name, scale in (("rewards/chosen", "logps/chosen"), ("rewards/rejected", "logps/rejected"),
                        ("logps/chosen", None), ("logps/rejected", None), ("kl/chosen", None), ("kl/rejected", None)):
        size = None if scale is None else BETA * want_metrics[scale]
        assert relative_error(metrics[name], want_metrics[name], scale=size) <= VALUES, name


CASES = [("tdpo2", "ref_policy", {}), ("tdpo1", "ref_policy", {"softcap": 9.0}),
         ("tdpo2", "policy_ref", {"temperature": 0.8}), ("tdpo1", "policy_ref", {})]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type,direction,transform", CASES, ids=str)
def test_budget_matches_lean_and_float64(loss_type, direction, transform, dtype, backend):
    batch = make_batch(dtype, bias=direction == "policy_ref", seed=len(str(transform)))
    catcher = strict()
    try:
        # Triton: the row kernels over 3 vocabulary blocks, the last one partial.
        with prefops.settings(backend=backend, workspace=40_000), forced(block=128):
            budget = fused_run(batch, loss_type, direction, strategy="budget", budget=one_pair(dtype), **transform)
            lean = fused_run(batch, loss_type, direction, strategy="lean", **transform)
    finally:
        catcher.__exit__(None, None, None)
    expected = reference_run(batch, loss_type, direction, **transform)
    check_close(budget, expected, dtype, *expected[3:])
    check_close(lean, expected, dtype, *expected[3:])
    assert float(budget[2]["num_tokens/chosen"]) == float((batch["targets"][:PAIRS] != -100).sum())


def test_large_logits_and_packed_layout():
    """Logits of size ~1e2 (shifted statistics must not cancel); flat tokens with seq_ids give the padded result."""
    batch = make_batch(torch.float32, scale=100.0, seed=3)
    catcher = strict()
    try:
        padded = fused_run(batch, "tdpo2", "ref_policy", strategy="budget", budget=one_pair(torch.float32))
        keep = (batch["targets"] != -100).reshape(-1)
        seq_ids = torch.arange(2 * PAIRS).repeat_interleave(LENGTH)[keep]
        flat = lambda x: x.reshape(-1, x.shape[-1])[keep]  # noqa: E731
        module = prefops.PreferenceLoss("tdpo2", beta=BETA, tdpo_alpha=ALPHA, strategy="budget",
                                        budget=one_pair(torch.float32))
        packed, _ = module(flat(batch["hidden"]), batch["weight"], batch["targets"].reshape(-1)[keep],
                           seq_ids=seq_ids, ref_hidden=flat(batch["ref_hidden"]), ref_weight=batch["ref_weight"])
    finally:
        catcher.__exit__(None, None, None)
    expected = reference_run(batch, "tdpo2", "ref_policy")
    check_close(padded, expected, torch.float32, *expected[3:])
    assert relative_error(packed, padded[0]) <= VALUES


def test_token_weights_and_forward_only():
    """token_weights scale both log-prob sums, never the KL; without grad the budget pass only evaluates."""
    batch = make_batch(torch.float32, seed=4)
    token_weights = torch.rand(2 * PAIRS, LENGTH) * (batch["targets"] != -100)
    args = (batch["hidden"], batch["weight"], batch["ref_hidden"], batch["ref_weight"], batch["targets"])
    groups = torch.stack([torch.arange(PAIRS), torch.arange(PAIRS) + PAIRS], 1)

    def head(logps, group_index, stats):
        return (logps - stats["ref_logp"] - 0.5 * stats["kl"] * stats["count"]).square().sum()

    outs = {strategy: sequence_kl_objective(*args, head=head, groups=groups, token_weights=token_weights,
                                            strategy=strategy, budget=one_pair(torch.float32))
            for strategy in ("lean", "budget")}
    kl, logp, ref_logp = (x.double() for x in reference_token_kl(*(x.double() for x in args[:4]), targets=args[4]))
    sums = lambda x: x.sum(1)  # noqa: E731
    count = sums((batch["targets"] != -100).double())
    weighted = lambda x: sums(x * token_weights.double())  # noqa: E731
    want = (weighted(logp) - weighted(ref_logp) - 0.5 * sums(kl) * count)[groups].square().sum()
    for out in outs.values():
        assert relative_error(out.loss, want) <= VALUES
        assert relative_error(out.stats["kl"], sums(kl)) <= VALUES
        assert relative_error(out.stats["ref_logp"], weighted(ref_logp)) <= VALUES
    with torch.no_grad():
        again = sequence_kl_objective(*args, head=head, groups=groups, token_weights=token_weights, strategy="budget",
                                      budget=one_pair(torch.float32))
    assert torch.equal(again.loss, outs["budget"].loss.detach())


@pytest.mark.parametrize("policy_first", [False, True])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_row_kernels_match_float64(policy_first, softcap):
    """Both backends' row KL statistics and gradient against float64 from the definitions."""
    from prefops.kernels.rows_kl import launch_rows_kl_grad, launch_rows_kl_stats

    n, vocab, temperature = 5, 5003, 0.9  # more than one vocabulary block, odd length
    g = torch.Generator().manual_seed(2)
    logits, ref_logits = torch.randn(n, vocab, generator=g) * 50, torch.randn(n, vocab, generator=g)
    logits[0, :] -= 1e3  # rows far from zero: the shifted statistics must not cancel
    ref_logits[1, :] += 1e3
    targets = torch.randint(0, vocab, (n,), generator=g)
    linear = logits.double().requires_grad_()
    z, y = transform64(linear, temperature, softcap), transform64(ref_logits.double(), temperature, softcap)
    za, zb = (z, y) if policy_first else (y, z)
    kl, lse_a, lse_b = kl64(za, zb), za.logsumexp(1), zb.logsumexp(1)
    logp_a, logp_b = (token_values64(side, targets)[0] for side in (za, zb))
    got = finalize_kl(launch_rows_kl_stats(logits, ref_logits, targets, policy_first, temperature, softcap))
    torch_got = finalize_kl(rows_kl_stats(logits, ref_logits, targets, policy_first, temperature, softcap, "torch"))
    for name, value, torch_value, expected in zip(("kl", "lse_a", "lse_b", "logp_a", "logp_b"), got, torch_got,
                                                  (kl, lse_a, lse_b, logp_a, logp_b)):
        assert relative_error(value, expected) <= value_tolerance(vocab), name
        assert relative_error(torch_value, expected) <= value_tolerance(vocab), name
    grad_kl, grad_logp = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2))
    logp = logp_a if policy_first else logp_b
    (expected,) = torch.autograd.grad((grad_kl * kl + grad_logp * logp).sum(), linear)
    lse, ref_lse = (lse_a, lse_b) if policy_first else (lse_b, lse_a)
    # The per-row inputs in fp32, as the kernels get them: an fp32 lse near -1e3 is off by ~1e-4,
    # which moves p by as much (the logits' size in the error model).
    per_row = [x.detach().float() for x in (lse, ref_lse, kl, grad_kl, grad_logp)]
    grad = launch_rows_kl_grad(logits, ref_logits, torch.empty(n, vocab), targets, *per_row, policy_first,
                               temperature, softcap)
    torch_grad = logits.clone()
    rows_kl_grads(torch_grad, ref_logits, torch_grad, targets, *per_row, policy_first, temperature, softcap, "torch")
    limit = grad_tolerance(torch.float32, 1, vocab, 1, max(z.abs().max().item(), y.abs().max().item()))
    assert relative_error(grad, expected) <= limit
    assert relative_error(torch_grad, expected) <= limit


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_budget_stays_within_its_budget(backend):
    pairs, length, hidden_size, vocab = 4, 24, 16, 1009
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2 * pairs, length, hidden_size, generator=g).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) / 4).requires_grad_()
    ref_hidden, ref_weight = hidden.detach() + 0.1, weight.detach() * 1.1
    targets = torch.randint(0, vocab, (2 * pairs, length), generator=g)
    targets[:, :4] = -100
    budget = (2 * 20) * vocab * budget_bytes_per_logit(torch.float32, sides=2)  # one pair's two sides in fp32
    module = prefops.PreferenceLoss("tdpo2", strategy="budget", budget=budget)
    recorder = AllocationRecorder()
    catcher = strict()
    try:
        with recorder, prefops.settings(backend=backend):
            module(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=ref_weight)[0].backward()
    finally:
        catcher.__exit__(None, None, None)
    biggest_bytes, biggest_numel, where = max(recorder.sizes)
    chunk = 2 * 20 * vocab * 4
    assert biggest_bytes >= chunk, "no chunk of logits was materialised: the budget path did not run"
    assert biggest_bytes <= max(budget, weight.numel() * 4, hidden.numel() * 4), where
    assert biggest_numel < 2 * pairs * 20 * vocab
    # The peak of live bytes, on both backends, is tests/test_memory.py's budget check.
    assert hidden.grad is not None and weight.grad is not None


def test_falls_back_to_lean_when_a_pair_does_not_fit():
    batch = make_batch(torch.float32, seed=5)
    with pytest.warns(UserWarning, match="does not fit the memory budget"):
        small = fused_run(batch, "tdpo2", "ref_policy", strategy="budget", budget=one_pair(torch.float32) // 4)
    lean = fused_run(batch, "tdpo2", "ref_policy", strategy="lean")
    assert torch.equal(small[0], lean[0]) and all(torch.equal(a, b) for a, b in zip(small[1], lean[1]))
