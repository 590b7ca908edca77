"""The core fused op against a float64 reference: values, gradients, layouts, bad input."""
import math

import pytest
import torch

import prefops
from conftest import grad_tolerance, relative_error, value_tolerance
from helpers import make_inputs, reference64, run_with_grads
from prefops.fused import WeightGrad

EXTRAS = dict(return_lse=True, return_entropy=True)


def check_against_reference(hidden, weight, bias, targets, *, backend, large_logits=False, **options):
    upstream = [torch.randn(targets.shape, dtype=torch.float64) for _ in range(3)]
    expected, expected_grads, sizes, logit_size = reference64(hidden, weight, bias, targets, upstream, **EXTRAS,
                                                              **options)
    fused = lambda *a, **k: prefops.linear_logprobs(*a, backend=backend, **k)  # noqa: E731
    actual, actual_grads = run_with_grads(fused, hidden, weight, bias, targets, upstream, **EXTRAS, **options)
    vocab, hidden_size = weight.shape
    tolerance = value_tolerance(hidden_size, vocab)
    assert relative_error(actual[0], expected[0]) <= tolerance, "logp"
    assert relative_error(actual[1], expected[1]) <= tolerance, "lse"
    # One-hot rows (large logits) have an entropy of ~1e-20: it carries the logits' absolute error.
    entropy_scale = torch.full_like(expected[2], logit_size) if large_logits else None
    assert relative_error(actual[2], expected[2], scale=entropy_scale) <= tolerance, "entropy"
    grad_limit = grad_tolerance(hidden.dtype, hidden_size, vocab, targets.numel(), logit_size)
    for name, a, e, size in zip(("hidden", "weight", "bias"), actual_grads, expected_grads, sizes):
        assert a.dtype == hidden.dtype
        assert relative_error(a, e, scale=size) <= grad_limit, f"grad of {name}"
    return actual_grads, expected_grads, sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{}, {"temperature": 0.7}, {"softcap": 5.0, "temperature": 1.3}])
def test_torch_backend_matches_float64(dtype, options):
    # V and H are multiples of no block size; a small workspace forces several row and vocabulary chunks.
    hidden, weight, targets, bias = make_inputs(45, 67, 1013, dtype=dtype, scale=4.0, bias=True)
    with prefops.settings(workspace=60_000):
        check_against_reference(hidden, weight, bias, targets, backend="torch", **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{}, {"softcap": 3.0, "temperature": 0.7}])
def test_triton_kernels_match_float64(dtype, options):
    """The real Triton kernels (under TRITON_INTERPRET=1 on CPU)."""
    hidden, weight, targets, bias = make_inputs(21, 35, 203, dtype=dtype, scale=4.0, bias=bool(options))
    with prefops.settings(workspace=20_000):
        check_against_reference(hidden, weight, bias, targets, backend="triton", **options)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_large_magnitude_logits(backend):
    # Logits of magnitude ~1e3: no overflow in lse, and the entropy (~1e-20 nats: one-hot
    # rows) must not come out as the difference of two numbers near 1e3. An fp32 logit of
    # that size is only known to ~1e-4 (its ulp is 6e-5), which bounds how well the
    # entropy and gradients of near-tied rows can match the float64 reference.
    hidden, weight, targets, _ = make_inputs(13, 19, 97, scale=1000.0)
    check_against_reference(hidden, weight, None, targets, backend=backend, large_logits=True)


def weight_grad(hidden, weight, targets, upstream, **settings):
    leaf = weight.clone().requires_grad_()
    with prefops.settings(**settings):
        (prefops.linear_logprobs(hidden, leaf, targets, backend="torch").double() * upstream).sum().backward()
    return leaf.grad


def test_fp32_weight_grad_accumulates_the_row_chunks_in_fp32(monkeypatch):
    # 96 counted rows in chunks of 16 (the workspace): 6 partial dW to add up.
    hidden, weight, targets, _ = make_inputs(128, 35, 203, dtype=torch.bfloat16, scale=4.0, seed=0)
    upstream = torch.randn(targets.shape, dtype=torch.float64)
    workspace = 2 * 16 * 12 * 35
    parts, accumulators = [], []
    real_add, real_result = WeightGrad.add, WeightGrad.result

    def add(self, v0, v1, tile, h_rows, first=False):
        parts.append((v0, v1, tile.double(), h_rows.double()))
        real_add(self, v0, v1, tile, h_rows, first)

    def result(self):
        accumulators.append(self.value.clone())
        return real_result(self)

    monkeypatch.setattr(WeightGrad, "add", add)
    monkeypatch.setattr(WeightGrad, "result", result)
    grad = weight_grad(hidden, weight, targets, upstream, workspace=workspace, fp32_weight_grad=True,
                       strategy="lean")
    (accumulator,) = accumulators
    assert accumulator.dtype == torch.float32 and grad.dtype == torch.bfloat16
    chunks = sum(v0 == 0 for v0, _, _, _ in parts)
    assert chunks == 6 and {h_rows.shape[0] for _, _, _, h_rows in parts} == {16}
    exact, size = torch.zeros(weight.shape, dtype=torch.float64), torch.zeros(weight.shape, dtype=torch.float64)
    for v0, v1, tile, h_rows in parts:
        exact[v0:v1] += tile.t() @ h_rows
        size[v0:v1] += tile.abs().t() @ h_rows.abs()
    # The sum of the chunks' exact bf16 products at the fp32 level: a GEMM over 16 rows, then 6 adds.
    assert relative_error(accumulator, exact, scale=size) <= value_tolerance(16, chunks)
    assert torch.equal(grad, accumulator.to(torch.bfloat16))  # one rounding, at the end

    monkeypatch.undo()
    want = reference64(hidden, weight, None, targets, [upstream])[1][1]
    default = weight_grad(hidden, weight, targets, upstream, workspace=workspace)
    error, default_error = relative_error(grad, want), relative_error(default, want)
    assert error <= default_error, (error, default_error)


def test_gradients_flow_only_from_counted_tokens():
    hidden, weight, targets, _ = make_inputs(12, 16, 50, ignore_every=0)
    targets[5:] = -100
    hidden.requires_grad_()
    prefops.linear_logprobs(hidden, weight, targets).sum().backward()
    assert hidden.grad[5:].abs().sum() == 0
    assert (hidden.grad[:5].abs().sum(1) > 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_ignored_rows(backend):
    hidden, weight, targets, _ = make_inputs(6, 16, 50)
    targets[:] = -100
    hidden.requires_grad_()
    weight.requires_grad_()
    out = prefops.linear_logprobs(hidden, weight, targets, backend=backend, **EXTRAS)
    assert torch.equal(out.logp, torch.zeros(6)) and torch.equal(out.lse, torch.zeros(6))
    out.logp.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_custom_ignore_index_and_batch_shape():
    hidden, weight, targets, _ = make_inputs(24, 16, 50, ignore_every=0)
    targets[::3] = 7  # a valid vocabulary id used as the ignore marker
    out = prefops.linear_logprobs(hidden.view(2, 3, 4, 16), weight, targets.view(2, 3, 4), ignore_index=7)
    expected = prefops.reference.linear_logprobs(hidden.double(), weight.double(), targets, ignore_index=7)
    assert out.shape == (2, 3, 4)
    assert relative_error(out.reshape(-1), expected) <= value_tolerance(16, 50)
    assert torch.equal(out.reshape(-1)[::3], torch.zeros(8))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_stays_in_its_token(backend):
    hidden, weight, targets, _ = make_inputs(8, 16, 50, ignore_every=0)
    hidden[3, 5] = float("nan")
    out = prefops.linear_logprobs(hidden, weight, targets, backend=backend)
    assert torch.isnan(out[3])
    assert not torch.isnan(out[torch.arange(8) != 3]).any()


def test_sum_p2_matches_reference():
    hidden, weight, targets, _ = make_inputs(20, 16, 77, scale=3.0)
    out = prefops.linear_logprobs(hidden, weight, targets, return_sum_p2=True)
    expected = prefops.reference.token_sum_p2(hidden.double(), weight.double(), targets)
    assert relative_error(out.sum_p2, expected) <= value_tolerance(16, 77)
    assert not out.sum_p2.requires_grad


def test_forward_only_path_saves_nothing():
    hidden, weight, targets, _ = make_inputs(10, 16, 50)
    hidden.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            out = prefops.linear_logprobs(hidden, weight, targets)
        assert not out.requires_grad and saved == []
        prefops.linear_logprobs(hidden, weight, targets)
    assert saved, "the training path must save what backward needs"


def test_packed_and_padded_layouts_give_the_same_sequence_sums():
    lengths = [5, 9, 3]
    hidden, weight, targets, _ = make_inputs(sum(lengths), 16, 50)
    packed = prefops.linear_logprobs(hidden, weight, targets)
    cu_seqlens = torch.tensor([0, 5, 14, 17])
    padded_h = torch.zeros(3, 9, 16)
    padded_t = torch.full((3, 9), -100)
    for i, (start, length) in enumerate(zip(cu_seqlens[:-1].tolist(), lengths)):
        padded_h[i, :length] = hidden[start:start + length]
        padded_t[i, :length] = targets[start:start + length]
    padded = prefops.linear_logprobs(padded_h, weight, padded_t)
    mask = padded_t != -100
    by_cu = prefops.sequence_sum(packed, cu_seqlens=cu_seqlens)
    by_ids = prefops.sequence_sum(packed, seq_ids=torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)))
    by_mask = prefops.sequence_sum(padded, mask)
    # The same tokens summed in another layout: the per-token values' error and a sum of <= 9 terms.
    rtol = value_tolerance(16, 50, max(lengths))
    assert torch.allclose(by_cu, by_mask, rtol=rtol) and torch.allclose(by_ids, by_mask, rtol=rtol)
    stats = prefops.sequence_stats(padded, mask)
    assert torch.equal(stats.count, mask.sum(1).float())
    assert torch.allclose(stats.mean, by_mask / stats.count)
    assert torch.equal(prefops.sequence_count(packed, targets != -100, cu_seqlens=cu_seqlens), stats.count)


def test_sequence_mean_of_an_empty_sequence_raises():
    with pytest.raises(ValueError, match="sequence 1 has no counted token"):
        prefops.sequence_mean(torch.ones(2, 3), torch.tensor([[True, True, False], [False, False, False]]))


def test_torch_compile_traces_without_graph_breaks():
    hidden, weight, targets, _ = make_inputs(10, 16, 50)

    def loss(h, w):
        return prefops.linear_logprobs(h, w, targets, softcap=4.0).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    h = hidden.clone().requires_grad_()
    compiled(h, weight).backward()
    h_eager = hidden.clone().requires_grad_()
    loss(h_eager, weight).backward()
    assert relative_error(h.grad, h_eager.grad) <= grad_tolerance(torch.float32, 16, 50, 10)


BAD_INPUTS = [
    (lambda h, w, t: (h, w[:, :-1], t), {}, ValueError, "weight must have shape"),
    (lambda h, w, t: (h, w.bfloat16(), t), {}, TypeError, "weight dtype"),
    (lambda h, w, t: (h.long(), w, t), {}, TypeError, "hidden must have dtype"),
    (lambda h, w, t: (h, w, t.float()), {}, TypeError, "targets must be an integer"),
    (lambda h, w, t: (h, w, t[:-1]), {}, ValueError, "targets must have shape"),
    (lambda h, w, t: (h, w, t.to("meta")), {}, ValueError, "targets is on meta"),
    (lambda h, w, t: (h, w, t.index_fill(0, torch.tensor([2]), 50)), {}, ValueError, r"\[0, 50\).*found 50"),
    (lambda h, w, t: (h, w, t.index_fill(0, torch.tensor([3]), -1)), {}, ValueError, "found -1 at position"),
    (lambda h, w, t: (h, w, t), {"temperature": 0.0}, ValueError, "temperature must be"),
    (lambda h, w, t: (h, w, t), {"temperature": math.inf}, ValueError, "temperature must be"),
    (lambda h, w, t: (h, w, t), {"softcap": -1.0}, ValueError, "softcap must be"),
    (lambda h, w, t: (h, w, t), {"bias": torch.zeros(49)}, ValueError, "bias must have shape"),
    (lambda h, w, t: (h, w, t), {"backend": "cuda"}, ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("transform, options, error, message", BAD_INPUTS)
def test_bad_input_is_named(transform, options, error, message):
    hidden, weight, targets, _ = make_inputs(6, 16, 50)
    with pytest.raises(error, match=message):
        prefops.linear_logprobs(*transform(hidden, weight, targets), **options)


def test_settings_validate_their_values():
    with pytest.raises(ValueError, match="strategy must be one of"):
        prefops.configure(strategy="fast")
    with pytest.raises(ValueError, match="budget must look like"):
        prefops.configure(budget="lots")
    with prefops.settings(budget="1.5GiB", strategy="budget") as current:
        assert current.budget == int(1.5 * 2**30) and current.strategy == "budget"
    assert prefops.get_settings().strategy == "auto"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_gpu_matches_float64(dtype):
    hidden, weight, targets, bias = make_inputs(1031, 515, 32_003, dtype=dtype, scale=4.0, bias=True, device="cuda")
    upstream = [torch.randn(targets.shape, dtype=torch.float64, device="cuda") for _ in range(3)]
    expected, expected_grads, sizes, logit_size = reference64(hidden, weight, bias, targets, upstream, **EXTRAS,
                                                              softcap=30.0)
    actual, actual_grads = run_with_grads(prefops.linear_logprobs, hidden, weight, bias, targets, upstream,
                                          **EXTRAS, softcap=30.0)
    # tf32 is off for fp32 (IEEE dots) and bf16 dots accumulate in fp32: the same error model as on CPU.
    for a, e in zip(actual, expected):
        assert relative_error(a, e) <= value_tolerance(515, 32_003)
    limit = grad_tolerance(dtype, 515, 32_003, 1031, logit_size)
    for a, e, size in zip(actual_grads, expected_grads, sizes):
        assert relative_error(a, e, scale=size) <= limit
