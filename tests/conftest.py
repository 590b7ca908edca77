import math
import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter; triton reads this
# when a kernel is defined, so it must be set before prefops.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def relative_error(actual, expected, scale=None):
    """||actual - expected|| / ||scale|| in float64 (scale defaults to expected); NaN anywhere gives inf.

    Pass `scale` for a difference of larger terms (a margin of two rewards): its error
    is set by the size of the terms, not by the small difference."""
    actual, expected = actual.double(), expected.double()
    if torch.isnan(actual).any() or torch.isnan(expected).any():
        return float("inf")
    scale = expected if scale is None else scale.double()
    return ((actual - expected).norm() / scale.norm().clamp_min(1e-30)).item()


# Error model of the fused ops against float64 of the *same* rounded inputs.
#
# Every path multiplies h and W with fp32 accumulation, whatever their dtype: a product of
# two bf16 or fp16 values is exact in fp32, so input rounding is not an error here (the
# reference sees the same values) and only fp32 roundings remain, u32 = 2^-24 ~ 6e-8 each.
# Rounding errors of a sum of n terms add up like a random walk, ~sqrt(n) u32 relative
# (n u32 is the worst case, never approached by random data), so with C = 4 covering the
# walk's constant and the few elementwise roundings (transform, exp, log):
#   - a logit z = h . W_v (H terms) is off by C sqrt(H) u32 |z|;
#   - a vocabulary sum (softmax normaliser, entropy, sum p^2, KL: V terms) adds C sqrt(V) u32
#     relative, an absolute error in log space;
#   - a sum over tokens (sequence sums, losses: N terms) adds C sqrt(N) u32 relative.
# A value of the size of the logits (log p, lse, KL, sequence sums, losses) is then off by
#   value_tolerance(H, V, N) = C u32 (sqrt(H) + sqrt(V) + sqrt(N)), normwise relative:
# ~1e-5 at H, V ~ 1000 (5e-6 at the interpreter's H = 35, V = 203), where one rounding of
# the logits to bf16 (2^-9 relative) is off by ~1e-3. A value near 0 (the entropy of one-hot
# rows at |z| ~ 1e3, a KL, sum p^2) carries the logits' absolute error instead: the same
# tolerance holds against the size of the logits, relative_error(..., scale=max |z|).
#
# Gradients: p = exp(z - lse) inherits the logits' absolute error as a relative one, and the
# dh = G W, dW = G^T h GEMMs add their sums, so in fp32 a gradient is off by
#   C u32 (sqrt(H) |z| + sqrt(V) + sqrt(N))  relative to | |G| |W| |, | |G|^T |h| |, sum |G|
# (the magnitude of the terms: the sums cancel). Half-precision inputs get a gradient in
# their dtype: the tile G is rounded to it before the GEMMs, and the result once more when
# stored, each <= u relative (u = 2^-8 for bf16, 2^-11 for fp16) of those magnitudes, so
#   grad_tolerance = 2 u + the fp32 part,
# normwise against the magnitudes (~u against the gradient itself, where sums cancel little).
# Triton's CPU interpreter truncates fp32 -> bf16 casts (toward zero: up to 2u, all of one
# sign, so sums do not average them out) where a GPU rounds to nearest: 3 u for bf16 there.
U32 = 2.0 ** -24
UNIT_ROUNDOFF = {torch.float32: U32, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
_WALK = 4


def value_tolerance(*lengths):
    """Normwise relative error of a value of the logits' size that fp32 arithmetic built through
    sums of these lengths (H for the logits, V for the vocabulary, N for a sum over tokens)."""
    return _WALK * U32 * sum(math.sqrt(n) for n in lengths)


def grad_tolerance(dtype, hidden_size, vocab, tokens=1, logit_size=1.0):
    """Normwise relative error of a gradient in `dtype`, against the magnitude of its terms."""
    fp32 = _WALK * U32 * (math.sqrt(hidden_size) * logit_size + math.sqrt(vocab) + math.sqrt(tokens))
    if dtype == torch.float32:
        return fp32
    tile = 2 if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1" else 1
    return (tile + 1) * UNIT_ROUNDOFF[dtype] + fp32


# Two fp32 computations of the same sums in another order (across ranks, micro-batches, chunks,
# or the fused and the reference path of a whole model) differ by at most ~2 n u32 sum_i |term_i|
# for sums of n terms (the worst case; random orders give sqrt(n), so this keeps that margin).
# A tensor's largest magnitude bounds sum_i |term_i| of its elements: an element that cancels to
# near 0 still carries the rounding of its large terms, which an absolute tolerance fixed once
# (1e-7) does not allow for. A real bug (a missing token, a wrong scale, a term counted twice)
# moves results by 1/n of the scale or more.
def fp32_tolerance(expected, terms, scale=None):
    """rtol and atol for torch.testing.assert_close of fp32 results summed over `terms` terms.

    scale: the magnitude of the terms where the tensor does not show it (a scalar metric that is a
    difference of larger sums); default the tensor's largest magnitude."""
    relative = 2 * terms * U32
    if scale is None:
        scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    return {"rtol": relative, "atol": relative * scale}


def assert_fp32_close(actual, expected, terms, name="", scale=None):
    torch.testing.assert_close(actual, expected, **fp32_tolerance(expected, terms, scale),
                               msg=lambda message: f"{name}: {message}")


def assert_records_close(actual: dict, expected: dict, terms):
    """Scalar metrics of one step (log-prob sums, rewards and their differences): each is formed
    from terms no larger than the record's largest value."""
    assert set(actual) == set(expected)
    scale = max(abs(float(value)) for value in expected.values())
    for name, value in expected.items():
        assert_fp32_close(torch.tensor(float(actual[name])), torch.tensor(float(value)), terms, name, scale)


def decoder_tolerance(config, length, dtype=torch.float32, tokens=1):
    """Normwise relative error of a decoder's final hidden states run in `dtype` against float64 of
    the same parameters; also of what is made from them, against its size: the logits, and with
    `tokens` parameter gradients summed over that many tokens.

    In fp32 each layer sums over the hidden size (norms, projections), the head dimension (scores),
    the keys (at most `length`) and the intermediate size (MLP). Half precision stores each layer's
    attention and MLP outputs and the final norm in `dtype`: the residual stream carries those
    2L + 1 roundings of u, independent (sqrt), as the logits then do against their size."""
    layers, width = config.num_hidden_layers, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or width // config.num_attention_heads
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * width
    fp32 = value_tolerance(*[width, head_dim, length, inner] * layers, tokens)
    if dtype == torch.float32:
        return fp32
    return math.sqrt(2 * layers + 1) * UNIT_ROUNDOFF[dtype] + fp32


def lm_tolerances(config, length, tokens, logit_rms, dtype=torch.float32):
    """(values, gradients): normwise relative errors of a causal LM's log-prob sums (against their
    terms: tokens times the logits' RMS) and parameter gradients, the decoder run in `dtype` and the
    fused head's fp32 logits, against float64 of the same parameters. p = softmax(z) turns the
    logits' error, relative to their size, into a relative error of the gradients."""
    head = value_tolerance(config.hidden_size, config.vocab_size, tokens)
    values = decoder_tolerance(config, length, dtype) + head
    return values, (decoder_tolerance(config, length, dtype, tokens) + head) * (1 + logit_rms)


def assert_fused_loss_matches(loss, metrics, actual_grads, reference, hidden, weight, dtype, metric_names):
    """A fused loss (from hidden, weight in `dtype`), its gradients [h.grad, W.grad] and the log-prob
    metrics `metric_names` against the float64 pipeline `reference` (see loss_reference64).

    Logits are fp32 from the rounded inputs whatever their dtype: the loss and the sums carry only
    fp32 error; the gradients, stored in the inputs' dtype, carry its rounding. Returns (expected
    metrics, the value tolerance) for the caller's own checks."""
    _, vocab = weight.shape
    hidden_size, tokens = hidden.shape[-1], hidden.numel() // hidden.shape[-1]
    expected, expected_metrics, grads, sizes, logit_size, loss_scale = loss_reference64(reference, hidden, weight)
    values = value_tolerance(hidden_size, vocab, tokens)
    assert relative_error(loss, expected, scale=loss_scale) <= values
    limit = grad_tolerance(dtype, hidden_size, vocab, tokens, logit_size)
    for name, grad, want, size in zip(("hidden", "weight"), actual_grads, grads, sizes):
        assert relative_error(grad, want, scale=size) <= limit, f"grad of {name}"
    for name in metric_names:
        assert relative_error(metrics[name], expected_metrics[name]) <= values, name
    return expected_metrics, values


def loss_reference64(reference, hidden, weight):
    """A float64 loss pipeline that materialises the logits itself, reference(hidden, weight) ->
    (loss, extras), through helpers.linear_grads64 on the same rounded inputs: it runs on the logits z
    as its hidden states with the identity as its weight (z I^T = z exactly), so autograd reaches G.

    Returns the loss, extras, [dh, dW], their magnitudes and max |z| as linear_grads64, and the loss's
    scale, the size of its terms: the loss moves by sum G dz, where each logit (and so the row's
    normaliser) is off by a fraction of its size, so a row contributes sum_v |G z| and rows err
    independently (normwise across rows). A loss that cancels (rDPO, IPO near its target) keeps the
    error of its terms, which relative_error(loss, expected, scale=...) allows for."""
    from helpers import linear_grads64

    first_order = []

    def loss(z):
        z.register_hook(lambda g: first_order.append((g * z.detach()).abs().sum(-1)))
        value, extras = reference(z.view(*hidden.shape[:-1], -1), torch.eye(z.shape[-1], dtype=z.dtype))
        return value, (value, extras)

    (value, extras), grads, sizes, logit_size = linear_grads64(hidden.reshape(-1, hidden.shape[-1]), weight, None,
                                                               loss)
    grads[0], sizes[0] = grads[0].view(hidden.shape), sizes[0].view(hidden.shape)
    return value, extras, grads, sizes, logit_size, first_order[0]
