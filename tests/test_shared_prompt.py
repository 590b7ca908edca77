"""Shared-prompt packing against the unshared padded layout, on a tiny Llama built from a config.

The reference is the ordinary layout ([prompt, response] per row, 2-D padding
mask) run by a float64 copy of the same model, with materialised logits; the
shared layout runs in fp32 or bf16 through the fused op.
"""
import copy

import pytest
import torch
import transformers

import prefops
from conftest import decoder_tolerance, lm_tolerances, relative_error
from prefops.losses import pairwise_loss
from prefops.shared_prompt import attention_mask_for, build_layout, shared_prompt_hidden_states, shared_prompt_logps

VOCAB = 97


def tiny_llama(dtype, implementation, seed=0):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    config._attn_implementation = implementation
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init, so log-probs are far from uniform
        model.lm_head.weight.mul_(40)
    return model.to(dtype)


def examples(k, num_examples=3, seed=0):
    """Prompts of 5..12 tokens; k responses each (k may be a list per example) of 1..9 tokens, one of a single token."""
    generator = torch.Generator().manual_seed(seed)
    counts = k if isinstance(k, list) else [k] * num_examples
    ids = lambda n: torch.randint(0, VOCAB, (n,), generator=generator)  # noqa: E731
    length = lambda low, high: int(torch.randint(low, high + 1, (), generator=generator))  # noqa: E731
    prompts = [ids(length(5, 12)).tolist() for _ in counts]
    responses = [[ids(length(1, 9)) for _ in range(c)] for c in counts]
    responses[0][-1] = ids(1)
    return prompts, responses


def reference_logps(model, layout):
    """float64 copy of the model on the unshared layout, materialised logits: per-sequence sums [S], and
    the size of one token's terms in them, the logits' RMS over the counted tokens."""
    model64 = copy.deepcopy(model).double()
    batch = layout.unshared()
    hidden = model64.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    token = prefops.reference.linear_logprobs(hidden, model64.lm_head.weight, batch.targets)
    counted = batch.targets != -100
    logit_rms = (hidden[counted] @ model64.lm_head.weight.t()).detach().pow(2).mean().sqrt().item()
    return model64, token.sum(1), logit_rms


def tolerances(model, layout, logit_rms):
    """conftest.lm_tolerances of the layout: (values, gradients). A bf16 model stores its activations in
    bf16, so unlike the fused head's fp32 logits of the same inputs, its hidden states, and the logits
    made from them, carry bf16 roundings of the logits' size: the bf16 tolerances derive from those,
    not from the head."""
    unshared = layout.unshared()
    return lm_tolerances(model.config, unshared.input_ids.shape[1], int((unshared.targets != -100).sum()), logit_rms,
                         model.dtype)


def sequence_terms(layout, logit_rms):
    """The size of each sequence's log-prob sum's terms: its counted tokens times the logits' RMS."""
    return (layout.unshared().targets != -100).sum(1).double() * logit_rms


def gradients(model):
    return torch.cat([p.grad.double().reshape(-1) for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("packing", ["example", "flat"])
@pytest.mark.parametrize("k", [2, 4, [3, 1, 4]], ids=["K2", "K4", "Kvaries"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logps_and_gradients_match_unshared(dtype, implementation, k, packing):
    model = tiny_llama(dtype, implementation)
    layout = build_layout(*examples(k), packing=packing)
    logps = shared_prompt_logps(model, layout)
    model64, expected, logit_rms = reference_logps(model, layout)
    assert logps.shape == expected.shape == (layout.num_sequences,)
    values, grads = tolerances(model, layout, logit_rms)
    assert relative_error(logps, expected, scale=sequence_terms(layout, logit_rms)) <= values

    upstream = torch.randn(layout.num_sequences, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (logps.double() * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert relative_error(gradients(model), gradients(model64)) <= grads


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dpo_loss_matches_unshared(dtype, implementation):
    """PreferenceLoss on the gathered rows (pair e = sequences e and E + e) equals DPO on the padded layout."""
    model = tiny_llama(dtype, implementation, seed=1)
    layout = build_layout(*examples(2, num_examples=4, seed=1), packing="flat")
    pairs = layout.num_examples
    ref = torch.randn(2 * pairs, generator=torch.Generator().manual_seed(2)) * 5 - 60
    hidden = layout.gather(shared_prompt_hidden_states(model, layout))
    loss, metrics = prefops.PreferenceLoss("sigmoid", beta=0.1)(
        hidden, model.lm_head.weight, layout.targets, seq_ids=layout.seq_ids,
        ref_chosen_logps=ref[:pairs], ref_rejected_logps=ref[pairs:])
    loss.backward()

    model64, sums, logit_rms = reference_logps(model, layout)
    lengths = layout.unshared().targets.ne(-100).sum(1).double()
    losses, expected = pairwise_loss(sums[:pairs], sums[pairs:], ref[:pairs].double(), ref[pairs:].double(),
                                     loss_type="sigmoid", beta=0.1, chosen_lengths=lengths[:pairs],
                                     rejected_lengths=lengths[pairs:])
    losses.mean().backward()
    values, grads = tolerances(model, layout, logit_rms)
    # The loss and the chosen reward move by at most β / P per unit of a sequence's sum.
    terms = 0.1 / pairs * sequence_terms(layout, logit_rms)
    assert relative_error(loss, losses.mean(), scale=terms) <= values
    assert relative_error(metrics["rewards/chosen"], expected["rewards/chosen"], scale=terms[:pairs]) <= values
    assert relative_error(gradients(model), gradients(model64)) <= grads


def test_layout_positions_targets_and_accounting():
    prompts = [[5, 6, 7], [8, 9]]
    responses = [[[1, 2], [3]], [[4, 4, 4], [2], [7, 7]]]
    layout = build_layout(prompts, responses, packing="flat", pad_to_multiple=8)
    assert layout.input_ids.tolist() == [[5, 6, 7, 1, 2, 3, 8, 9, 4, 4, 4, 2, 7, 7, 0, 0]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4, 2, 2, 3, 0, 0]]
    # slot-major sequence numbers: first responses (0, 1), second (2, 3), third (4)
    assert layout.groups.tolist() == [[0, 2, -1], [1, 3, 4]]
    assert layout.seq_ids.tolist() == [0, 0, 1, 1, 1, 2, 3, 4, 4]
    assert layout.targets.tolist() == [1, 2, 4, 4, 4, 3, 2, 7, 7]
    # each response's first token is predicted by its example's last prompt token (flat index 2 or 7)
    assert layout.rows.tolist() == [2, 3, 7, 8, 9, 2, 7, 7, 12]
    assert layout.accounting() == {"tokens": 14, "unshared_tokens": 21, "tokens_saved": 7, "padded_tokens": 16,
                                   "unshared_padded_tokens": 25, "scored_tokens": 9}
    per_example = build_layout(prompts, responses)
    assert per_example.input_ids.shape == (2, 8)
    assert per_example.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 0], [0, 1, 2, 3, 4, 2, 2, 3]]
    assert per_example.rows.tolist() == [2, 3, 9, 10, 11, 2, 9, 9, 14]


def test_mask_hides_other_responses():
    layout = build_layout([[5, 6]], [[[1, 2], [3, 4]]])
    allowed = layout.dense_mask()[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0],
                       [1, 1, 0, 0, 1, 0],
                       [1, 1, 0, 0, 1, 1]]
    additive = attention_mask_for(layout, "eager", torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, layout.dense_mask())


def test_block_mask_matches_dense_mask():
    from torch.nn.attention.flex_attention import create_mask
    layout = build_layout(*examples([3, 1, 4], seed=3), packing="flat", pad_to_multiple=16)
    rows, length = layout.input_ids.shape
    dense = create_mask(layout.mask_mod(), rows, None, length, length, device="cpu")
    assert torch.equal(dense.expand(rows, 1, length, length), layout.dense_mask())
    block_mask = layout.block_mask(block_size=16)
    assert tuple(block_mask.shape) == (rows, 1, length, length)
    # blocks of one example never see another example's blocks: the mask is block sparse
    assert block_mask.sparsity() > 0


@pytest.mark.slow
def test_flex_attention_body_matches_sdpa():
    """transformers runs flex attention compiled; on CPU that takes a while, so only the forward is compared."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    layout = build_layout(*examples(2, num_examples=2, seed=4), packing="flat", pad_to_multiple=16)
    flex = tiny_llama(torch.float32, "flex_attention")
    sdpa = tiny_llama(torch.float32, "sdpa")
    with torch.no_grad():
        got = layout.gather(shared_prompt_hidden_states(flex, layout))
        expected = layout.gather(shared_prompt_hidden_states(sdpa, layout))
    # Two fp32 computations, each within the decoder's tolerance of float64.
    assert relative_error(got, expected) <= 2 * decoder_tolerance(flex.config, layout.input_ids.shape[1])


def test_refuses_bad_input():
    with pytest.raises(ValueError, match=r"responses\[0\]\[1\] is empty"):
        build_layout([[1, 2]], [[[3], []]])
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        build_layout([[1], []], [[[3]], [[4]]])
    with pytest.raises(ValueError, match=r"responses\[0\] must be a list of K >= 1"):
        build_layout([[1, 2]], [[]])
    with pytest.raises(ValueError, match="one entry per example"):
        build_layout([[1, 2]], [[[3]], [[4]]])
    with pytest.raises(ValueError, match="need at least one example"):
        build_layout([], [])
    with pytest.raises(TypeError, match=r"prompts\[0\] must hold integer token ids"):
        build_layout([torch.tensor([1.0, 2.0])], [[[3]]])
    with pytest.raises(ValueError, match="negative token id"):
        build_layout([[1, -2]], [[[3]]])
    with pytest.raises(ValueError, match="packing must be one of example, flat"):
        build_layout([[1]], [[[3]]], packing="rows")
    with pytest.raises(ValueError, match="pad_to_multiple must be an int >= 1"):
        build_layout([[1]], [[[3]]], pad_to_multiple=0)
    layout = build_layout([[1]], [[[3]]])
    with pytest.raises(ValueError, match="flash-attention"):
        attention_mask_for(layout, "flash_attention_2")
    with pytest.raises(ValueError, match=r"hidden must have shape \[R, L, H\]"):
        layout.gather(torch.zeros(1, 3, 4))
