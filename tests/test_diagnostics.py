"""Likelihood diagnostics (entropy, top-k entropy and mass, sum p^2) and CHES against float64 references."""
import pytest
import torch

import prefops
from prefops.diagnostics import ches_scores, linear_diagnostics, sequence_diagnostics
from prefops.kernels.config import forced
from prefops.memory import AllocationRecorder
from prefops.reference import diagnostics as reference
from prefops.reference.logprobs import logits as reference_logits
from conftest import relative_error, value_tolerance
from helpers import make_inputs

FIELDS = ("logp", "entropy", "top_k_entropy", "top_k_mass", "sum_p2", "top_k_logp")


def check_against_reference(hidden, weight, bias, targets, *, backend, top_k, large_logits=False, **options):
    actual = linear_diagnostics(hidden, weight, targets, bias=bias, top_k=top_k, backend=backend, **options)
    up = lambda x: None if x is None else x.double()  # noqa: E731
    expected = reference.linear_diagnostics(up(hidden), up(weight), targets, bias=up(bias), top_k=top_k, **options)
    tolerance = value_tolerance(weight.shape[1], weight.shape[0])
    # Near one-hot rows (large logits): entropies ~0 and masses ~1 carry the logits' absolute error.
    logit_size = reference_logits(up(hidden), up(weight), bias=up(bias), **options).abs().max().item()
    near_zero = ("entropy", "top_k_entropy", "top_k_mass", "sum_p2") if large_logits else ()
    for name in FIELDS:
        value = getattr(actual, name)
        assert value.dtype == torch.float32 and value.shape == expected[name].shape, name
        scale = torch.full_like(expected[name], logit_size) if name in near_zero else None
        assert relative_error(value, expected[name], scale=scale) <= tolerance, name
    check_top_k_ids(actual, expected, targets)
    assert actual.kl_to_reference is None
    return actual


def check_top_k_ids(actual, expected, targets):
    """The id sets equal torch.topk's wherever the k-th and (k+1)-th logits are not within rounding of each other."""
    counted = targets.reshape(-1) != -100
    ids, expected_ids = actual.top_k_ids.reshape(-1, actual.top_k_ids.shape[-1]), expected["top_k_ids"]
    expected_ids = expected_ids.reshape(ids.shape)
    assert (ids[~counted] == -1).all() and (ids[counted] >= 0).all()
    logp = expected["top_k_logp"].reshape(ids.shape)
    clear = (logp[:, -2] - logp[:, -1] > 1e-3) if ids.shape[1] > 1 else torch.ones_like(counted)
    for row in (counted & clear).nonzero().squeeze(1).tolist():
        assert set(ids[row, :-1].tolist()) == set(expected_ids[row, :-1].tolist()), row
    same = [set(a.tolist()) == set(b.tolist()) for a, b in zip(ids[counted], expected_ids[counted])]
    assert sum(same) >= 0.9 * len(same), "top-k ids differ from torch.topk beyond rounding ties"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"softcap": 5.0, "temperature": 1.3}])
def test_torch_backend_matches_float64(dtype, options):
    # Odd V and H; a small workspace forces several vocabulary chunks, so the running top-k merges.
    hidden, weight, targets, bias = make_inputs(45, 67, 1013, dtype=dtype, scale=4.0, bias=True)
    with prefops.settings(workspace=60_000):
        check_against_reference(hidden, weight, bias, targets, backend="torch", top_k=10, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_float64(dtype):
    """The real kernel under TRITON_INTERPRET=1, with four vocabulary splits to merge (the last one partial)."""
    hidden, weight, targets, bias = make_inputs(21, 35, 331, dtype=dtype, scale=4.0, bias=True)
    with forced(v_per_split=88):
        check_against_reference(hidden, weight, bias, targets, backend="triton", top_k=7, softcap=6.0,
                                temperature=0.8)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_large_magnitude_logits(backend):
    # Logits ~1e3: near one-hot rows, top-k entropy ~0 and mass ~1 without overflow or cancellation.
    # An fp32 logit that large is only known to ~1e-4, which bounds the agreement.
    hidden, weight, targets, _ = make_inputs(13, 19, 97, scale=1000.0)
    check_against_reference(hidden, weight, None, targets, backend=backend, top_k=5, large_logits=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_top_k_is_exactly_torch_topk(backend):
    # Integer logits, exact in fp32: row r sees column j_r of W, a permutation of distinct integers.
    n, hidden_size, vocab, k = 12, 8, 301, 10
    weight = torch.stack([torch.randperm(vocab) - vocab // 2 for _ in range(hidden_size)], 1).float()
    hidden = torch.nn.functional.one_hot(torch.randint(0, hidden_size, (n,)), hidden_size).float()
    targets = torch.randint(0, vocab, (n,))
    out = linear_diagnostics(hidden, weight, targets, top_k=k, backend=backend)
    values, ids = (hidden @ weight.t()).topk(k)
    assert torch.equal(out.top_k_ids, ids)  # distinct values: same ids, same (descending) order
    lse = torch.logsumexp(hidden.double() @ weight.double().t(), 1)
    assert relative_error(out.top_k_logp, values.double() - lse[:, None]) <= value_tolerance(hidden_size, vocab)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_top_k_with_ties_keeps_the_multiset(backend):
    # Only five distinct logit values: the k-th is tied with many others; values must match
    # torch.topk's exactly, and the ids must be distinct tokens holding those values.
    n, vocab, k = 9, 203, 10
    weight = torch.randint(-2, 3, (vocab, 1)).float()
    hidden = torch.ones(n, 1)
    targets = torch.randint(0, vocab, (n,))
    out = linear_diagnostics(hidden, weight, targets, top_k=k, backend=backend)
    z = (hidden @ weight.t())
    lse = torch.logsumexp(z.double(), 1, keepdim=True)
    assert relative_error(out.top_k_logp, z.topk(k).values - lse, scale=lse.expand(-1, k)) <= value_tolerance(1, vocab)
    assert torch.equal(z.gather(1, out.top_k_ids), z.topk(k).values)
    assert all(len(set(row.tolist())) == k for row in out.top_k_ids)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_k_of_one_and_k_of_v(backend):
    hidden, weight, targets, _ = make_inputs(10, 16, 40, scale=3.0, ignore_every=0)
    first = linear_diagnostics(hidden, weight, targets, top_k=1, backend=backend)
    assert torch.equal(first.top_k_entropy, torch.zeros(10))
    assert torch.allclose(first.top_k_mass, first.top_k_logp[:, 0].exp())
    every = linear_diagnostics(hidden, weight, targets, top_k=40, backend=backend)
    tolerance = value_tolerance(16, 40)
    assert torch.allclose(every.top_k_mass, torch.ones(10), rtol=0, atol=tolerance)
    assert relative_error(every.top_k_entropy, every.entropy) <= tolerance
    assert torch.equal(every.top_k_ids.sort(1).values, torch.arange(40).expand(10, 40))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ignored_tokens_and_batch_shape(backend):
    hidden, weight, targets, _ = make_inputs(24, 16, 50, ignore_every=3)
    out = linear_diagnostics(hidden.view(2, 12, 16), weight, targets.view(2, 12), top_k=4, backend=backend)
    assert out.top_k_ids.shape == (2, 12, 4) and out.entropy.shape == (2, 12)
    ignored = targets.view(2, 12) == -100
    for name in FIELDS:
        assert (getattr(out, name)[ignored] == 0).all(), name
    assert (out.top_k_ids[ignored] == -1).all()
    assert (out.top_k_mass[~ignored] > 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_stays_in_its_token(backend):
    hidden, weight, targets, _ = make_inputs(8, 16, 50, ignore_every=0)
    hidden[3, 5] = float("nan")
    out = linear_diagnostics(hidden, weight, targets, backend=backend)
    assert torch.isnan(out.entropy[3]) and torch.isnan(out.top_k_mass[3])
    others = torch.arange(8) != 3
    for name in FIELDS:
        assert not torch.isnan(getattr(out, name)[others]).any(), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_logits_sized_tensor_is_allocated(backend):
    n, hidden_size, vocab = 40, 32, 1009
    hidden, weight, targets, _ = make_inputs(n, hidden_size, vocab, ignore_every=3)
    recorder = AllocationRecorder()
    with recorder, prefops.settings(workspace=64 * 1024):
        linear_diagnostics(hidden, weight, targets, top_k=10, backend=backend)
    assert recorder.sizes, "the recorder saw nothing: the test would pass vacuously"
    counted = int((targets != -100).sum())
    biggest_bytes, biggest_numel, where = max(recorder.sizes)
    assert biggest_numel < counted * vocab, f"{where} allocated {biggest_numel} elements (N x V = {counted * vocab})"
    assert biggest_bytes <= max(weight.numel() * 4, 64 * 1024), where
    naive = AllocationRecorder()
    with naive:
        reference.linear_diagnostics(hidden, weight, targets)
    assert max(numel for _, numel, _ in naive.sizes) >= n * vocab


def test_forward_only():
    hidden, weight, targets, _ = make_inputs(10, 16, 50)
    out = linear_diagnostics(hidden.requires_grad_(), weight, targets)
    assert not any(value.requires_grad for value in out if value is not None)


BAD_INPUTS = [
    ({"top_k": 0}, ValueError, r"top_k must be an int in \[1, V = 50\]; got 0"),
    ({"top_k": 51}, ValueError, r"top_k must be an int in \[1, V = 50\]; got 51"),
    ({"top_k": 2.5}, ValueError, "top_k must be an int"),
    ({"top_k": True}, ValueError, "top_k must be an int"),
    ({"ref_hidden": torch.zeros(6, 16)}, ValueError, "needs both ref_hidden and ref_weight"),
    ({"ref_hidden": torch.zeros(5, 16), "ref_weight": torch.zeros(50, 16)}, ValueError, "ref_hidden must have shape"),
    ({"ref_hidden": torch.zeros(6, 8), "ref_weight": torch.zeros(49, 8)}, ValueError, "vocabularies differ"),
    ({"backend": "gpu"}, ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("options, error, message", BAD_INPUTS)
def test_bad_input_is_named(options, error, message):
    hidden, weight, targets, _ = make_inputs(6, 16, 50)
    with pytest.raises(error, match=message):
        linear_diagnostics(hidden, weight, targets, **options)


def test_large_k_leaves_the_kernel_for_the_torch_path():
    hidden, weight, targets, _ = make_inputs(6, 16, 100)
    with pytest.raises(ValueError, match="top_k must be <= 64 with backend='triton'"):
        linear_diagnostics(hidden, weight, targets, top_k=65, backend="triton")
    with prefops.settings(backend="auto"):  # on CUDA auto picks the torch path for k > 64
        assert linear_diagnostics(hidden, weight, targets, top_k=65).top_k_ids.shape == (6, 65)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("direction", ["policy_ref", "ref_policy"])
def test_kl_to_reference_matches_float64(backend, direction):
    hidden, weight, targets, bias = make_inputs(21, 35, 203, scale=4.0, bias=True)
    # A reference of another width (H_ref != H), as a smaller or a larger model would be.
    ref_hidden, ref_weight, _, ref_bias = make_inputs(21, 24, 203, scale=4.0, bias=True)
    options = dict(bias=bias, top_k=5, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
                   kl_direction=direction, softcap=6.0)
    actual = linear_diagnostics(hidden, weight, targets, backend=backend, **options)
    up = lambda x: None if not isinstance(x, torch.Tensor) else x.double()  # noqa: E731
    expected = reference.linear_diagnostics(hidden.double(), weight.double(), targets,
                                            **{k: up(v) if isinstance(v, torch.Tensor) else v
                                               for k, v in options.items()})
    assert relative_error(actual.kl_to_reference, expected["kl_to_reference"]) <= value_tolerance(35, 24, 203)
    assert (actual.kl_to_reference[targets == -100] == 0).all() and (actual.kl_to_reference[targets != -100] > 0).all()
    means = sequence_diagnostics(actual, targets, seq_ids=torch.arange(21) // 7)
    assert means.kl_to_reference.shape == (3,)


def test_shapes_are_checked():
    hidden, weight, targets, _ = make_inputs(6, 16, 50)
    with pytest.raises(ValueError, match="weight must have shape"):
        linear_diagnostics(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match=r"\[0, 50\).*found 50"):
        linear_diagnostics(hidden, weight, targets.index_fill(0, torch.tensor([1]), 50))


def test_sequence_diagnostics_padded_and_packed():
    lengths = [5, 9, 3]
    hidden, weight, targets, _ = make_inputs(sum(lengths), 16, 50, ignore_every=4)
    packed = linear_diagnostics(hidden, weight, targets, top_k=3)
    seq_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    by_ids = sequence_diagnostics(packed, targets, seq_ids=seq_ids)
    padded_h = torch.zeros(3, 9, 16)
    padded_t = torch.full((3, 9), -100)
    expected = reference.linear_diagnostics(hidden.double(), weight.double(), targets, top_k=3)
    for i, (start, length) in enumerate(zip([0, 5, 14], lengths)):
        padded_h[i, :length] = hidden[start:start + length]
        padded_t[i, :length] = targets[start:start + length]
    by_mask = sequence_diagnostics(linear_diagnostics(padded_h, weight, padded_t, top_k=3), padded_t)
    counted = targets != -100
    for name in FIELDS[:-1]:
        means = torch.stack([expected[name][(seq_ids == s) & counted].mean() for s in range(3)])
        assert relative_error(getattr(by_ids, name), means) <= value_tolerance(16, 50, 9), name
        assert relative_error(getattr(by_mask, name), means) <= value_tolerance(16, 50, 9), name
    assert by_ids.kl_to_reference is None
    assert torch.equal(by_ids.count, by_mask.count)
    with pytest.raises(ValueError, match="sequence 0 has no counted token"):
        sequence_diagnostics(packed, torch.full_like(targets, -100), seq_ids=seq_ids)


def make_pairs(pairs, length_chosen, length_rejected, hidden_size, dtype=torch.float32):
    chosen = torch.randn(pairs, length_chosen, hidden_size, dtype=torch.float64) * 3 + 1
    rejected = torch.randn(pairs, length_rejected, hidden_size, dtype=torch.float64) * 3 + 1
    masks = []
    for length in (length_chosen, length_rejected):
        mask = torch.zeros(pairs, length, dtype=torch.bool)
        for i in range(pairs):  # a prompt, then the response, then padding
            start = int(torch.randint(0, length // 2, ()))
            mask[i, start:start + int(torch.randint(1, length - start + 1, ()))] = True
        masks.append(mask)
    return chosen.to(dtype), rejected.to(dtype), masks[0], masks[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalized", [False, True])
def test_ches_matches_float64(dtype, normalized):
    chosen, rejected, mask_chosen, mask_rejected = make_pairs(5, 13, 17, 33, dtype)
    actual = ches_scores(chosen, rejected, mask_chosen, mask_rejected, normalized=normalized)
    expected = reference.ches_scores(chosen.double(), rejected.double(), mask_chosen, mask_rejected,
                                     normalized=normalized)
    assert actual.dtype == torch.float32 and actual.shape == (5,)
    # The score is a difference of inner products: its rounding error scales with ||S+|| (||S+|| + ||S-||).
    sums = [(h.double() * m[..., None]).sum(1) / (m.sum(1, keepdim=True) if normalized else 1)
            for h, m in ((chosen, mask_chosen), (rejected, mask_rejected))]
    scale = sums[0].norm(dim=1) * (sums[0].norm(dim=1) + sums[1].norm(dim=1))
    # Sums over at most 17 tokens, then inner products over H = 33, in fp32.
    assert relative_error(actual, expected, scale=scale) <= value_tolerance(17, 33)


def test_ches_known_values():
    chosen, rejected, mask_chosen, mask_rejected = make_pairs(3, 7, 7, 8, torch.float64)
    # Identical responses embed alike: CHES = 0, the most displacement-prone that a pair can get in this family.
    same = ches_scores(chosen, chosen, mask_chosen, mask_chosen)
    assert torch.allclose(same, torch.zeros(3, dtype=torch.float64), atol=1e-9)
    # A rejected response embedded opposite to the chosen one: CHES = -2 ||S+||^2.
    total = (chosen * mask_chosen[..., None]).sum(1)
    opposite = ches_scores(chosen, -chosen, mask_chosen, mask_chosen)
    assert torch.allclose(opposite, -2 * (total * total).sum(1))
    normalized = ches_scores(chosen, chosen * 2, mask_chosen, mask_chosen, normalized=True)
    mean = total / mask_chosen.sum(1, keepdim=True)
    assert torch.allclose(normalized, (mean * mean).sum(1))
    # Masked-out positions (prompt, padding) never count.
    noisy = chosen.masked_fill(~mask_chosen[..., None], 1e6)
    assert torch.allclose(ches_scores(noisy, rejected, mask_chosen, mask_rejected),
                          ches_scores(chosen, rejected, mask_chosen, mask_rejected))


CHES_BAD = [
    (lambda c, r, mc, mr: (c[:2], r, mc[:2], mr), ValueError, "must agree in B"),
    (lambda c, r, mc, mr: (c, r[..., :-1], mc, mr), ValueError, "must agree in B .pairs. and H"),
    (lambda c, r, mc, mr: (c[0], r, mc, mr), ValueError, r"hidden_chosen must be a tensor of shape \[B, T, H\]"),
    (lambda c, r, mc, mr: (c, r, mc[:, :-1], mr), ValueError, "mask_chosen must have shape"),
    (lambda c, r, mc, mr: (c, r, mc, mr.float()), TypeError, "mask_rejected must be a bool tensor"),
    (lambda c, r, mc, mr: (c, r, mc, mr & False), ValueError, r"mask_rejected\[0\] selects no position"),
]


@pytest.mark.parametrize("transform, error, message", CHES_BAD)
def test_ches_bad_input_is_named(transform, error, message):
    with pytest.raises(error, match=message):
        ches_scores(*transform(*make_pairs(3, 6, 8, 4)))
