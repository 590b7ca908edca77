"""attn_implementation="prefops": packed and shared-prompt attention without a T x T mask.

A tiny Llama (GQA: 4 query heads, 2 key/value heads) runs in fp32 through prefops
attention, against a float64 copy of the same model with eager attention and a
mask: the padded batch (one sequence per row), or the shared-prompt layout's own
dense mask. Hidden states and every parameter gradient must agree to fp32
rounding (conftest.decoder_tolerance, ~1e-5 normwise relative); a token attending
to one key too many or too few moves them by 1e-2 or more.
"""
import copy
import inspect
import math

import pytest
import torch
import transformers

import prefops.attention as attention
from conftest import decoder_tolerance
from conftest import relative_error as _relative_error
from prefops.attention import PackedLayout
from prefops.memory import AllocationRecorder
from prefops.shared_prompt import attention_mask_for, build_layout

VOCAB = 97
attention.register()


def tiny_model(cls=transformers.LlamaModel, config_cls=transformers.LlamaConfig, seed=0, **extra):
    """The decoder body only: the lm_head adds nothing to attention."""
    config = config_cls(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    torch.manual_seed(seed)
    return cls._from_config(config, attn_implementation="prefops")


def reference_of(model, implementation="eager"):
    """A float64 copy running transformers' own attention with a mask."""
    reference = copy.deepcopy(model).double()
    reference.config._attn_implementation = implementation
    return reference


def relative_error(actual, expected):
    return _relative_error(actual.detach(), expected.detach())


def gradients(model):
    return torch.cat([p.grad.double().reshape(-1) for p in model.parameters() if p.grad is not None])


def ragged(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator) for n in lengths]


def padded(sequences):
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(sequences):
        ids[row, :len(s)], mask[row, :len(s)] = s, 1
    return ids, mask


def packed(sequences):
    return (torch.cat(sequences)[None],
            torch.cat([torch.arange(len(s)) for s in sequences])[None])


def check_against(model, hidden, reference, expected, upstream, length):
    """Values, then gradients of <hidden, upstream> in every parameter (sums over the tokens); `length`:
    the most keys a query sees."""
    tokens = hidden.numel() // hidden.shape[-1]
    assert relative_error(hidden, expected) <= decoder_tolerance(model.config, length)
    (hidden.double() * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert relative_error(gradients(model), gradients(reference)) <= decoder_tolerance(model.config, length,
                                                                                       tokens=tokens)


LENGTHS = [9, 1, 14, 5, 3, 12]


def test_padding_free_matches_padded_reference():
    """input_ids [1, N] with position_ids restarting at 0, transformers' padding-free convention."""
    model = tiny_model()
    reference = reference_of(model)
    sequences = ragged(LENGTHS)
    ids, positions = packed(sequences)
    hidden = model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state[0]
    ids_padded, mask = padded(sequences)
    expected = reference(input_ids=ids_padded, attention_mask=mask, use_cache=False).last_hidden_state
    expected = expected[mask.bool()]  # the real tokens in sequence order, as packed
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    check_against(model, hidden, reference, expected, upstream, max(LENGTHS))


def test_padded_batch_falls_back_to_the_mask():
    """An attention_mask with padding (left and right) gets transformers' SDPA mask, as 'sdpa' would.
    (The float64 eager reference cannot take left padding: its additive mask, float64's min, overflows
    to -inf when scores are added, and a query row that sees nothing turns to NaN.)"""
    model = tiny_model(seed=1)
    reference = reference_of(model, "sdpa")
    ids, mask = padded(ragged(LENGTHS[:4], seed=2))
    mask[1] = mask[1].flip(0)  # one row left-padded
    ids[1] = ids[1].roll(int((mask[1] == 0).sum()))
    hidden = model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    expected = reference(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    real = mask.bool()
    upstream = torch.randn(expected[real].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    check_against(model, hidden[real], reference, expected[real], upstream, ids.shape[1])


def shared_examples(k, seed):
    generator = torch.Generator().manual_seed(seed)
    length = lambda low, high: int(torch.randint(low, high + 1, (), generator=generator))  # noqa: E731
    counts = k if isinstance(k, list) else [k] * 3
    prompts = [torch.randint(0, VOCAB, (length(4, 12),), generator=generator) for _ in counts]
    responses = [[torch.randint(0, VOCAB, (length(1, 9),), generator=generator) for _ in range(c)] for c in counts]
    return prompts, responses


def check_shared_layout(model, reference, layout, seed):
    """The model on a shared-prompt layout (prefops attention) against the float64 reference with
    the layout's eager mask: hidden states and, through random upstream values, every gradient."""
    hidden = model(input_ids=layout.input_ids, position_ids=layout.position_ids, prefops_layout=layout,
                   use_cache=False).last_hidden_state
    expected = reference(input_ids=layout.input_ids, position_ids=layout.position_ids, use_cache=False,
                         attention_mask=attention_mask_for(layout, "eager", torch.float64)).last_hidden_state
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    check_against(model, hidden, reference, expected, upstream, layout.input_ids.shape[1])


@pytest.mark.parametrize("packing", ["flat", "example"])
@pytest.mark.parametrize("k", [2, 4, [3, 1, 4]], ids=["K2", "K4", "Kvaries"])
def test_shared_prompt_matches_masked_reference(k, packing):
    """Each response attends to [prompt; itself]; the prompt's K/V gradients add up over the responses."""
    model = tiny_model(seed=2)
    reference = reference_of(model)
    layout = build_layout(*shared_examples(k, seed=len(str(k))), packing=packing, pad_to_multiple=8)
    check_shared_layout(model, reference, layout, seed=4)  # padding too: one causal run per row in both


def test_shared_prompt_matches_unshared_padded_batch():
    """The shared layout's response hidden states equal each [prompt, response] row run alone."""
    model = tiny_model(seed=3)
    reference = reference_of(model)
    layout = build_layout(*shared_examples(4, seed=5), packing="flat")
    hidden = model(input_ids=layout.input_ids, position_ids=layout.position_ids, prefops_layout=layout,
                   use_cache=False).last_hidden_state
    unshared = layout.unshared()
    expected = reference(input_ids=unshared.input_ids, attention_mask=unshared.attention_mask,
                         use_cache=False).last_hidden_state
    # layout.rows index the predicting hidden states in the shared layout; in the unshared one they are
    # the positions of the targets, one column earlier.
    counted = unshared.targets != -100
    assert relative_error(layout.gather(hidden), expected[counted]) <= decoder_tolerance(model.config,
                                                                                         unshared.input_ids.shape[1])


def test_sliding_window_matches_each_sequence_alone():
    """Mistral with a window shorter than the sequences: chunks of the window, each against the keys it sees."""
    model = tiny_model(transformers.MistralModel, transformers.MistralConfig, seed=4, sliding_window=4)
    reference = reference_of(model)
    sequences = ragged([11, 3, 9], seed=6)
    ids, positions = packed(sequences)
    hidden = model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state[0]
    # Each sequence alone: padded rows would hold pad queries that see no key, NaN in eager float64.
    expected = torch.cat([reference(input_ids=s[None], use_cache=False).last_hidden_state[0] for s in sequences])
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    check_against(model, hidden, reference, expected, upstream, max(len(s) for s in sequences))


# ----------------------------------------------------------------------------- no T x T tensor

def largest_allocation(model, **inputs):
    recorder = AllocationRecorder()
    with recorder:
        hidden = model(use_cache=False, **inputs).last_hidden_state
        hidden.square().sum().backward()
    return max(numel for _, numel, _ in recorder.sizes)


def test_packed_paths_allocate_no_tokens_squared_tensor():
    """Forward and backward of ~500 packed tokens allocate nothing near T x T; the mask path does (control)."""
    model = tiny_model(seed=5)
    sequences = ragged([32] * 16, seed=8)
    ids, positions = packed(sequences)
    tokens = ids.shape[1]
    # What is left are activations and weights, [T, 80] at most: far below T^2 / 4.
    assert largest_allocation(model, input_ids=ids, position_ids=positions) < tokens * tokens / 4
    responses = [[s[:16] for s in sequences[6 + e:10 + e]] for e in range(6)]
    layout = build_layout([s[:24] for s in sequences[:6]], responses, packing="flat")
    length = layout.input_ids.shape[1]
    assert largest_allocation(model, input_ids=layout.input_ids, position_ids=layout.position_ids,
                              prefops_layout=layout) < length * length / 4
    masked = reference_of(model, "sdpa").float()
    assert largest_allocation(masked, input_ids=ids, position_ids=positions) >= tokens * tokens
    assert largest_allocation(masked, input_ids=layout.input_ids, position_ids=layout.position_ids,
                              attention_mask=layout.dense_mask()) >= length * length


# ----------------------------------------------------------------------------- flash-attn's varlen path

def varlen_by_definition(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
                         window_size=(-1, -1), softcap=0.0):
    """flash_attn_varlen_func as documented: per sequence, bottom-right causal, window (left, right), GQA."""
    assert causal and dropout_p == 0.0 and softcap == 0.0
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    out = []
    for (a, b), (c, d) in zip(zip(cu_q[:-1].tolist(), cu_q[1:].tolist()), zip(cu_k[:-1].tolist(), cu_k[1:].tolist())):
        qi, ki, vi = q[a:b], k[c:d], v[c:d]
        groups = qi.shape[1] // ki.shape[1]
        ki, vi = ki.repeat_interleave(groups, 1), vi.repeat_interleave(groups, 1)
        scores = torch.einsum("qhd,khd->hqk", qi, ki) * softmax_scale
        at = torch.arange(b - a)[:, None] + (d - c) - (b - a)
        key = torch.arange(d - c)[None, :]
        visible = (key <= at) & ((key >= at - window_size[0]) if window_size[0] >= 0 else True)
        weights = scores.masked_fill(~visible, -math.inf).softmax(-1)
        out.append(torch.einsum("hqk,khd->qhd", weights, vi))
    return torch.cat(out)


def test_flash_path_cu_seqlens_and_gathered_keys(monkeypatch):
    """The varlen call's arguments (cu_seqlens, each block's [prompt; response] keys) against the reference,
    with the kernel replaced by its definition so the plumbing runs without a GPU."""
    monkeypatch.setattr(attention, "_use_flash", lambda query, value: True)
    monkeypatch.setattr(attention, "_flash_varlen", lambda: varlen_by_definition)
    model = tiny_model(seed=6)
    reference = reference_of(model)
    layout = build_layout(*shared_examples([2, 3, 1], seed=9), packing="example")
    check_shared_layout(model, reference, layout, seed=10)


@pytest.mark.gpu
def test_flash_attn_on_gpu_matches_masked_reference():
    pytest.importorskip("flash_attn")
    model = tiny_model(seed=7).to("cuda", torch.bfloat16)
    reference = reference_of(model).to("cuda")
    layout = build_layout(*shared_examples(4, seed=11), packing="flat", device="cuda")
    hidden = model(input_ids=layout.input_ids, position_ids=layout.position_ids, prefops_layout=layout,
                   use_cache=False).last_hidden_state
    expected = reference(input_ids=layout.input_ids, position_ids=layout.position_ids, use_cache=False,
                         attention_mask=attention_mask_for(layout, "eager", torch.float64)).last_hidden_state
    real = layout.document_ids >= 0
    # bf16 activations against float64 of the same bf16 parameters: the decoder's own roundings.
    assert relative_error(hidden[real], expected[real]) <= decoder_tolerance(model.config, layout.input_ids.shape[1],
                                                                             torch.bfloat16)


# ----------------------------------------------------------------------------- layouts and errors

def test_layouts_from_positions_cu_seqlens_and_shared_prompt():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert PackedLayout.from_position_ids(positions).blocks == ((0, 3, -1), (3, 5, -1), (5, 6, -1), (6, 12, -1))
    cu = torch.tensor([0, 3, 5, 6], dtype=torch.int32)
    assert PackedLayout.from_cu_seqlens(cu, 6).blocks == ((0, 3, -1), (3, 5, -1), (5, 6, -1))
    layout = build_layout([[5, 6, 7], [8, 9]], [[[1, 2], [3]], [[4, 4, 4], [2], [7, 7]]], packing="flat",
                          pad_to_multiple=8)
    blocks = PackedLayout.from_shared_prompt(layout)
    assert blocks.blocks == ((0, 3, -1), (3, 5, 0), (5, 6, 0), (6, 8, -1), (8, 11, 3), (11, 12, 3), (12, 14, 3),
                             (14, 16, -1))
    cu_q, cu_k, max_q, max_k, index = blocks.varlen(torch.device("cpu"))
    assert cu_q.tolist() == [0, 3, 5, 6, 8, 11, 12, 14, 16]
    assert cu_k.tolist() == [0, 3, 8, 12, 14, 19, 22, 26, 28] and (max_q, max_k) == (3, 5)
    assert index[3:8].tolist() == [0, 1, 2, 3, 4]


def test_cu_seq_lens_kwargs_are_read():
    """DataCollatorWithFlattening's flash kwargs, without restarting positions, still keep sequences apart."""
    # Rotary attention depends on relative positions only, so a sequence at positions 5..11 attends as at 0..6.
    model = tiny_model(seed=8)
    sequences = ragged([5, 7, 4], seed=12)
    ids, positions = packed(sequences)
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        got = model(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7,
                    use_cache=False).last_hidden_state
        whole = model(input_ids=ids, use_cache=False).last_hidden_state
    # Two fp32 computations, each within the decoder's tolerance of float64.
    assert relative_error(got, expected) <= 2 * decoder_tolerance(model.config, 7)
    assert relative_error(whole, expected) > 1e-2  # one sequence over all tokens: the blocks matter


def test_mask_function_keeps_dense_masks_it_cannot_express():
    from transformers.masking_utils import and_masks, causal_mask_function, or_masks, sliding_window_overlay

    plain = dict(batch_size=1, q_length=6, kv_length=6, dtype=torch.float32, allow_is_causal_skip=True)
    assert attention.mask_forward(mask_function=causal_mask_function, **plain) is None
    windowed = and_masks(sliding_window_overlay(3), causal_mask_function)
    assert attention.mask_forward(mask_function=windowed, **plain) is None
    # transformers turns allow_is_causal_skip off for an overlay; the overlay alone must make the mask dense
    image = or_masks(causal_mask_function, lambda b, h, q, kv: kv < 2)
    assert attention.mask_forward(mask_function=image, **dict(plain, allow_is_causal_skip=False)).shape == \
        (1, 1, 6, 6)
    padding = torch.tensor([[0, 1, 1, 1, 1, 1]])
    assert attention.mask_forward(mask_function=causal_mask_function, attention_mask=padding, **plain).shape == \
        (1, 1, 6, 6)


def test_cache_continuation_runs_as_sdpa():
    """With a cache the keys outnumber the queries: transformers' mask and SDPA, as 'sdpa' runs them."""
    model = tiny_model(seed=10)
    sdpa = reference_of(model, "sdpa").float()
    ids = ragged([9], seed=13)[0][None]
    # transformers 5.24 renamed past_key_values to cache; the floor (5.4) has the old name.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        got, expected = (m(input_ids=ids[:, 5:], **{name: getattr(m(input_ids=ids[:, :5], use_cache=True), name)})
                         .last_hidden_state for m in (model, sdpa))
        whole = model(input_ids=ids, use_cache=False).last_hidden_state[:, 5:]
    assert torch.equal(got, expected)
    assert relative_error(got, whole) <= 2 * decoder_tolerance(model.config, ids.shape[1])


def test_refuses_bad_input():
    model = tiny_model(seed=9)
    layout = build_layout([[1, 2, 3]], [[[4, 5], [6]]])
    with pytest.raises(ValueError, match="prefops_layout describes the whole packed batch"):
        model(input_ids=layout.input_ids, attention_mask=layout.dense_mask(), prefops_layout=layout)
    with pytest.raises(ValueError, match=r"prefops_layout describes a 1 x 6 batch; the model runs 1 x 5"):
        model(input_ids=layout.input_ids[:, :5], prefops_layout=layout)
    with pytest.raises(TypeError, match="prefops_layout must be a prefops.attention.PackedLayout"):
        model(input_ids=layout.input_ids, prefops_layout="flat")
    with pytest.raises(ValueError, match="cu_seq_lens must rise strictly from 0 to the 6 tokens"):
        model(input_ids=layout.input_ids, cu_seq_lens_q=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="blocks must partition"):
        PackedLayout(1, 4, ((0, 2, -1), (3, 4, -1)))
    with pytest.raises(ValueError, match="block 1's parent must be an earlier block of its row"):
        PackedLayout(2, 2, ((0, 2, -1), (2, 4, 0)))
