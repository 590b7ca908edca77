"""prefops.linear_token_kl against the float64 reference on materialised logits: KL, target
log-probs and the policy gradients, both backends, both directions, memory, bad input."""
import pytest
import torch

import prefops
from conftest import grad_tolerance, relative_error, value_tolerance
from helpers import linear_grads64, make_inputs, token_kl_loss, transform64
from prefops.memory import AllocationRecorder
from prefops.reference.token_kl import linear_token_kl as reference_token_kl
from prefops.token_kl import linear_token_kl


def make_pair(n, hidden_size, ref_hidden_size, vocab, *, dtype=torch.float32, scale=4.0, bias=False):
    hidden, weight, targets, b = make_inputs(n, hidden_size, vocab, dtype=dtype, scale=scale, bias=bias)
    ref_hidden, ref_weight, _, ref_b = make_inputs(n, ref_hidden_size, vocab, dtype=dtype, scale=scale, bias=bias)
    mask = torch.rand(n) > 0.2
    return dict(hidden=hidden, weight=weight, bias=b, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_b,
                targets=targets, mask=mask)


def run(case, upstream, *, with_targets=True, **options):
    """Outputs of linear_token_kl and the policy gradients of Σ kl * u_0 + Σ logp * u_1."""
    leaves = {k: case[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")
              if case[k] is not None}
    out = linear_token_kl(leaves["hidden"], leaves["weight"], case["ref_hidden"], case["ref_weight"],
                          bias=leaves.get("bias"), ref_bias=case["ref_bias"], mask=case["mask"],
                          targets=case["targets"] if with_targets else None, **options)
    outs = tuple(out) if with_targets else (out,)
    total = sum((o.double() * u).sum() for o, u in zip(outs[:2], upstream))
    grads = torch.autograd.grad(total, list(leaves.values()))
    return [o.detach() for o in outs], grads


def expected64(case, upstream, *, with_targets=True, direction="ref_policy", temperature=1.0, softcap=None):
    """The same from the definitions in float64 (tests/helpers.py): outputs, gradients, their magnitudes, max |z|."""
    targets = case["targets"] if with_targets else torch.full_like(case["targets"], -100)
    counted = case["mask"] & (targets != -100) if with_targets else case["mask"]
    ref_linear = case["ref_hidden"].double() @ case["ref_weight"].double().t()
    ref_z = transform64(ref_linear + (0.0 if case["ref_bias"] is None else case["ref_bias"].double()), temperature,
                        softcap)
    loss = token_kl_loss(ref_z, targets, counted, direction == "policy_ref", upstream)
    outs, grads, sizes, logit_size = linear_grads64(case["hidden"], case["weight"], case["bias"], loss, temperature,
                                                    softcap)
    return (outs if with_targets else outs[:1]), grads, sizes, logit_size


def check(case, *, backend, with_targets=True, large_logits=False, **options):
    upstream = [torch.randn(case["targets"].shape, dtype=torch.float64) for _ in range(2)]
    actual, actual_grads = run(case, upstream, with_targets=with_targets, backend=backend, **options)
    expected, expected_grads, sizes, logit_size = expected64(case, upstream, with_targets=with_targets, **options)
    vocab, hidden_size = case["weight"].shape
    tolerance = value_tolerance(hidden_size, case["ref_weight"].shape[1], vocab)
    counted = case["mask"] & (case["targets"] != -100) if with_targets else case["mask"]
    for name, a, e in zip(("kl", "logp", "ref_logp"), actual, expected):
        assert a.dtype == torch.float32
        assert torch.equal(a[~counted], torch.zeros_like(a[~counted])), f"{name} not 0 at uncounted tokens"
        # With logits ~1e3 a KL (a difference of such logits) carries their absolute error.
        scale = torch.full_like(e, logit_size) if large_logits and name == "kl" else None
        assert relative_error(a, e, scale=scale) <= tolerance, name
    limit = grad_tolerance(case["hidden"].dtype, hidden_size, vocab, counted.numel(), logit_size)
    for name, a, e, size in zip(("hidden", "weight", "bias"), actual_grads, expected_grads, sizes):
        assert a.dtype == case["hidden"].dtype
        assert relative_error(a, e, scale=size) <= limit, f"grad of {name}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", ["ref_policy", "policy_ref"])
@pytest.mark.parametrize("options", [{}, {"softcap": 5.0, "temperature": 1.3}])
@pytest.mark.parametrize("strategy", ["lean", "sliced"])
def test_torch_backend_matches_float64(dtype, direction, options, strategy):
    # V, H, H_ref multiples of no block; a small workspace forces several row and vocabulary chunks
    # (sliced: rows of 5 and slices of 256 columns).
    case = make_pair(45, 67, 53, 1013, dtype=dtype, bias=True)
    with prefops.settings(workspace=60_000, strategy=strategy):
        check(case, backend="torch", direction=direction, **options)
        assert prefops.strategy.last_path() == strategy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", ["ref_policy", "policy_ref"])
@pytest.mark.parametrize("strategy,vocab,workspace", [("lean", 203, 20_000), ("sliced", 600, 20_000)])
def test_triton_kernels_match_float64(dtype, direction, strategy, vocab, workspace):
    """The real Triton kernels (under TRITON_INTERPRET=1 on CPU): the lean fused kernels, or the sliced
    path's row kernels over slices of 256 columns (600 = 256 + 256 + 88) and chunks of rows."""
    case = make_pair(21, 35, 19, vocab, dtype=dtype, bias=direction == "policy_ref")
    options = {"softcap": 3.0, "temperature": 0.7} if direction == "policy_ref" else {}
    with prefops.settings(workspace=workspace, strategy=strategy):
        check(case, backend="triton", direction=direction, **options)
        assert prefops.strategy.last_path() == strategy


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kl_alone_with_a_mask(backend):
    case = make_pair(17, 24, 24, 150)
    check(case, backend=backend, with_targets=False, direction="policy_ref")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_large_magnitude_logits(backend):
    # Logits ~1e3: the KL is a difference of terms of that size unless both shifts are kept.
    # An fp32 logit is only known to ~1e-4 there, and a near-tie in the weighting side
    # multiplies that by the ~1e3 log-ratio, which bounds the agreement per token.
    case = make_pair(13, 19, 19, 97, scale=1000.0)
    check(case, backend=backend, large_logits=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_identical_models_give_zero_kl_and_no_kl_gradient(backend):
    case = make_pair(9, 16, 16, 77)
    hidden = case["hidden"].clone().requires_grad_()
    kl = linear_token_kl(hidden, case["weight"], case["hidden"], case["weight"], backend=backend)
    # 0 up to the rounding of the logits' size (the same fp32 logits on both sides).
    logit_size = (case["hidden"] @ case["weight"].t()).abs().max().item()
    assert kl.abs().max() <= value_tolerance(16, 77) * logit_size
    (grad,) = torch.autograd.grad(kl.sum(), hidden)
    assert grad.abs().max() <= grad_tolerance(torch.float32, 16, 77, 9, logit_size) * case["weight"].abs().sum(0).max()
    # A different reference gives a positive KL in both directions.
    for direction in ("ref_policy", "policy_ref"):
        kl = linear_token_kl(case["hidden"], case["weight"], case["ref_hidden"], case["ref_weight"],
                             direction=direction, backend=backend)
        assert (kl > 0).all()


def test_reference_gets_no_gradient():
    case = make_pair(8, 12, 12, 40)
    ref_hidden = case["ref_hidden"].clone().requires_grad_()
    hidden = case["hidden"].clone().requires_grad_()
    linear_token_kl(hidden, case["weight"], ref_hidden, case["ref_weight"]).sum().backward()
    assert ref_hidden.grad is None and hidden.grad is not None


def test_padded_batch_shape_and_sequence_sums():
    case = make_pair(2 * 3 * 7, 16, 16, 61)
    shaped = {k: v.view(6, 7, -1) for k, v in case.items() if k in ("hidden", "ref_hidden")}
    targets, mask = case["targets"].view(6, 7), case["mask"].view(6, 7)
    out = linear_token_kl(shaped["hidden"], case["weight"], shaped["ref_hidden"], case["ref_weight"], mask=mask,
                          targets=targets)
    flat = linear_token_kl(case["hidden"], case["weight"], case["ref_hidden"], case["ref_weight"],
                           mask=case["mask"], targets=case["targets"])
    assert out.kl.shape == (6, 7) and torch.equal(out.kl.reshape(-1), flat.kl)
    counted = mask & (targets != -100)
    assert torch.allclose(prefops.sequence_sum(out.kl, counted), out.kl.sum(1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_logits_sized_tensor_in_forward_or_backward(backend):
    n, hidden_size, vocab = 96, 32, 1009
    case = make_pair(n, hidden_size, hidden_size, vocab)
    hidden, weight = case["hidden"].requires_grad_(), case["weight"].requires_grad_()
    workspace = 64 * 1024

    def step():
        with prefops.settings(workspace=workspace, backend=backend):
            out = linear_token_kl(hidden, weight, case["ref_hidden"], case["ref_weight"], targets=case["targets"],
                                  mask=case["mask"])
            (out.kl.sum() - out.logp.sum()).backward()

    recorder = AllocationRecorder()
    with recorder:
        step()
    assert recorder.sizes, "the recorder saw nothing: the test would pass vacuously"
    assert any("mm" in op or "matmul" in op for _, _, op in recorder.sizes), "the GEMMs inside the op were not seen"
    counted = int((case["mask"] & (case["targets"] != -100)).sum())
    biggest_bytes, biggest_numel, where = max(recorder.sizes)
    assert biggest_numel < counted * vocab, f"{where} allocated {biggest_numel} elements (N x V = {counted * vocab})"
    assert biggest_bytes <= max(weight.numel() * 4, workspace), f"{where} allocated {biggest_bytes} bytes"
    assert weight.grad is not None and hidden.grad is not None

    naive = AllocationRecorder()
    with naive:
        reference_token_kl(hidden, weight, case["ref_hidden"], case["ref_weight"])
    assert max(numel for _, numel, _ in naive.sizes) >= n * vocab, "the recorder misses the naive N x V logits"


def test_torch_compile_traces_the_op():
    case = make_pair(10, 16, 16, 50)
    fn = lambda h: linear_token_kl(h, case["weight"], case["ref_hidden"], case["ref_weight"],  # noqa: E731
                                   backend="torch").sum()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(case["hidden"]), fn(case["hidden"]))


def test_bad_input_is_named():
    case = make_pair(6, 12, 10, 40)
    h, w, rh, rw = case["hidden"], case["weight"], case["ref_hidden"], case["ref_weight"]
    with pytest.raises(ValueError, match="vocabularies differ.*V = 40.*39"):
        linear_token_kl(h, w, rh, rw[:-1])
    with pytest.raises(ValueError, match="ref_hidden must have shape .* leading shape of hidden"):
        linear_token_kl(h, w, rh[:-1], rw)
    with pytest.raises(ValueError, match="ref_weight must have shape \\[V, H_ref\\] with H_ref = .* 10"):
        linear_token_kl(h, w, rh, w)
    with pytest.raises(ValueError, match="weight must have shape \\[V, H\\]"):
        linear_token_kl(h, rw, rh, rw)
    with pytest.raises(ValueError, match="direction must be one of 'ref_policy', 'policy_ref'"):
        linear_token_kl(h, w, rh, rw, direction="forward")
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        linear_token_kl(h, w, rh, rw, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="ref_hidden dtype"):
        linear_token_kl(h, w, rh.bfloat16(), rw.bfloat16())
    with pytest.raises(ValueError, match="targets must lie in \\[0, 40\\)"):
        linear_token_kl(h, w, rh, rw, targets=torch.full((6,), 40))
    with pytest.raises(ValueError, match="ref_bias must have shape"):
        linear_token_kl(h, w, rh, rw, ref_bias=torch.zeros(39))


def test_sequence_kl_padded_and_packed():
    from prefops.token_kl import sequence_kl

    case = make_pair(4 * 6, 16, 12, 61)
    hidden, ref_hidden = case["hidden"].view(4, 6, -1), case["ref_hidden"].view(4, 6, -1)
    targets = case["targets"].view(4, 6)
    got = sequence_kl(hidden, case["weight"], ref_hidden, case["ref_weight"], targets)
    kl = reference_token_kl(hidden.double(), case["weight"].double(), ref_hidden.double(), case["ref_weight"].double())
    expected = torch.where(targets != -100, kl, 0.0).sum(1)
    tolerance = value_tolerance(16, 12, 61, 6)
    assert relative_error(got, expected) <= tolerance
    seq_ids = torch.arange(4).repeat_interleave(6)
    seq_ids[:3] = -1
    packed = sequence_kl(case["hidden"], case["weight"], case["ref_hidden"], case["ref_weight"], case["targets"],
                         seq_ids=seq_ids, num_sequences=4)
    expected[0] -= torch.where(targets[0, :3] != -100, kl[0, :3], 0.0).sum()
    assert relative_error(packed, expected) <= tolerance
