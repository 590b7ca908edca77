"""prefops.integrations.hf against the materialised logits of the model's own forward, in float64.

Each tiny model (tied embeddings, Gemma-2 softcap, Cohere / Granite logit scaling,
LoRA) is scored twice: by preference_loss (fp32, fused, no logits) and by a float64
copy of the model whose model(...).logits go through log_softmax into the same
sequence-level loss. Loss and every parameter gradient must agree.
"""
import copy
import warnings

import pytest
import torch
import transformers

import prefops
import prefops.attention
from conftest import lm_tolerances, relative_error
from prefops.integrations.hf import LMHead, PreferenceInputs, check_head, final_hidden_states, preference_loss
from prefops.losses import pairwise_loss
from prefops.memory import AllocationRecorder

VOCAB, PAIRS, LENGTH = 97, 3, 11
BODY = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=12, max_position_embeddings=64)


def tiny(config_class, model_class, logit_gain=20.0, seed=0, **extra):
    """A tiny model whose logits reach tens (so softcap and scaling matter)."""
    torch.manual_seed(seed)
    config = config_class(**{**BODY, **extra})
    config._attn_implementation = "eager"
    model = model_class(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(logit_gain)
    return model


def llama(**extra):
    return tiny(transformers.LlamaConfig, transformers.LlamaForCausalLM, **{"tie_word_embeddings": True, **extra})


def padded_batch(seed, pairs=PAIRS, length=LENGTH, with_ref=True):
    """Right-padded [chosen; rejected] batch with TRL's completion_mask; prompts 2-4 tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    input_ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    completion_mask = torch.zeros(rows, length, dtype=torch.long)
    for i in range(rows):
        prompt = int(torch.randint(2, 5, (1,), generator=g)) if i < pairs else None
        prompt = prompt if prompt is not None else int(completion_mask[i - pairs].argmax())  # same prompt length
        end = int(torch.randint(prompt + 2, length + 1, (1,), generator=g))
        attention_mask[i, :end] = 1
        completion_mask[i, prompt:end] = 1
    input_ids[pairs:, :4] = input_ids[:pairs, :4]  # a pair shares its prompt
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask)
    if with_ref:
        batch["ref_chosen_logps"] = -10 - 5 * torch.rand(pairs, generator=g)
        batch["ref_rejected_logps"] = -10 - 5 * torch.rand(pairs, generator=g)
    return batch


def packed(batch):
    """The same sequences back to back in one row, position_ids restarting at 0 (padding-free)."""
    keep = batch["attention_mask"].bool()
    lengths = keep.sum(1)
    out = {k: v for k, v in batch.items() if k.startswith("ref_")}
    out["input_ids"] = batch["input_ids"][keep][None]
    out["completion_mask"] = batch["completion_mask"][keep][None]
    out["position_ids"] = torch.cat([torch.arange(int(n)) for n in lengths])[None]
    return out


def reference_logps(model64, batch, adapters=True):
    """Summed completion log-probs [2P] from the model's own float64 logits, the completion lengths, and
    the logits' RMS over the completion tokens (the size of one token's terms in a sum)."""
    context = model64.disable_adapter() if not adapters else torch.enable_grad()
    with context:
        logits = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].double()
    logit_rms = logits[:, :-1][mask.bool()].detach().pow(2).mean().sqrt().item()
    return (logp * mask).sum(1), mask.sum(1), logit_rms


def reference_loss(model64, batch, loss_type="sigmoid", beta=0.1, ref=None, **kwargs):
    """(loss, metrics, sizes): sizes["sums"], the size of each log-prob sum's terms, and sizes["loss"],
    those times the loss's slope in the sum."""
    sums, lengths, logit_rms = reference_logps(model64, batch)
    ref = (batch["ref_chosen_logps"].double(), batch["ref_rejected_logps"].double()) if ref is None else ref
    losses, metrics = pairwise_loss(sums[:PAIRS], sums[PAIRS:], *ref, loss_type=loss_type, beta=beta,
                                    chosen_lengths=lengths[:PAIRS], rejected_lengths=lengths[PAIRS:], **kwargs)
    (slope,) = torch.autograd.grad(losses.mean(), sums, retain_graph=True)
    sizes = {"sums": lengths * logit_rms, "loss": slope.abs() * lengths * logit_rms, "logit_rms": logit_rms}
    return losses.mean(), metrics, sizes


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def tolerances(model, batch, sizes):
    """lm_tolerances of this batch: (values, gradients)."""
    tokens = int(batch["completion_mask"][:, 1:].sum())
    return lm_tolerances(model.config, LENGTH, tokens, sizes["logit_rms"])


def layouts_tolerances(model, batch):
    """Two fp32 computations of the same loss from another layout of the batch, each within its
    tolerances of float64: (values, gradients, the size of the loss's terms)."""
    sizes = reference_loss(copy.deepcopy(model).double(), batch)[2]
    values, gradients = tolerances(model, batch, sizes)
    return 2 * values, 2 * gradients, sizes["loss"]


def assert_matches(model, batch, loss=None, ref_model=None, reference=None):
    """preference_loss on the fp32 model equals the float64 materialised-logits loss, loss and gradients."""
    model64 = copy.deepcopy(model).double()
    value, metrics = preference_loss(model, batch, loss, ref_model=ref_model)
    expected, expected_metrics, sizes = reference(model64) if reference else reference_loss(model64, batch)
    assert torch.isfinite(value)
    values, gradients = tolerances(model, batch, sizes)
    assert relative_error(value.detach(), expected.detach(), scale=sizes["loss"]) <= values
    assert relative_error(grads(model, value), grads(model64, expected)) <= gradients
    # Means of log-prob sums, and β times their differences with the reference (β <= 1 here).
    terms = sizes["sums"].mean()
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert relative_error(metrics[key], expected_metrics[key], scale=terms) <= values, key
    return value


def test_tied_embeddings_match_materialised_logits():
    model = llama()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert_matches(model, padded_batch(1))


def test_gemma2_softcap_matches_materialised_logits():
    model = tiny(transformers.Gemma2Config, transformers.Gemma2ForCausalLM, final_logit_softcapping=3.0)
    head = check_head(model)
    assert head.softcap == 3.0
    with pytest.raises(ValueError, match="does not reproduce"):  # the softcap matters at these logits
        check_head(model, LMHead(head.weight, head.bias, 1.0, None))
    assert_matches(model, padded_batch(2))


@pytest.mark.parametrize("name", ["cohere", "granite"])
def test_logit_scaling_matches_materialised_logits(name):
    if name == "cohere":
        model = tiny(transformers.CohereConfig, transformers.CohereForCausalLM, logit_scale=0.25)
        expected_temperature = 4.0
    else:
        model = tiny(transformers.GraniteConfig, transformers.GraniteForCausalLM, logits_scaling=3.0,
                     tie_word_embeddings=False)
        expected_temperature = 3.0
    head = check_head(model)
    assert head.temperature == pytest.approx(expected_temperature)
    with pytest.raises(ValueError, match="does not reproduce"):
        check_head(model, LMHead(head.weight, head.bias, 1.0, None))
    assert_matches(model, padded_batch(3))


@pytest.mark.parametrize("loss_type,weights", [("ipo", None), (["sigmoid", "sft"], [1.0, 0.5])])
def test_loss_types_and_untied_head(loss_type, weights):
    model = llama(tie_word_embeddings=False)
    batch = padded_batch(4)
    loss = prefops.PreferenceLoss(loss_type, beta=0.2, loss_weights=weights)
    assert_matches(model, batch, loss,
                   reference=lambda m64: reference_loss(m64, batch, loss_type, 0.2, loss_weights=weights))


def test_ref_model_runs_forward_only():
    model, ref_model = llama(), llama(seed=1)
    batch = padded_batch(5, with_ref=False)
    ref_sums = reference_logps(copy.deepcopy(ref_model).double(), batch)[0]
    ref_model.requires_grad_(False)
    assert_matches(model, batch, ref_model=ref_model,
                   reference=lambda m64: reference_loss(m64, batch, ref=(ref_sums[:PAIRS], ref_sums[PAIRS:])))


def test_lora_policy_uses_disabled_adapters_as_reference():
    peft = pytest.importorskip("peft")
    base = llama()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                      init_lora_weights=False))
    batch = padded_batch(6, with_ref=False)

    def reference(model64):
        ref_sums = reference_logps(model64, batch, adapters=False)[0]
        return reference_loss(model64, batch, ref=(ref_sums[:PAIRS].detach(), ref_sums[PAIRS:].detach()))

    assert_matches(model, batch, reference=reference)
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_lora_on_the_lm_head_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(llama(tie_word_embeddings=False),
                                peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head"):
        LMHead.of(model)


@pytest.mark.parametrize("attention", ["prefops", "model"])
def test_padding_free_equals_padded(monkeypatch, attention):
    """A padding-free batch on an eager model runs prefops attention for that call (a spy sees its blocks), or
    the model's own mask with attention="model"; both equal the padded batch, and the model stays eager."""
    blocks = []
    run_blocks = prefops.attention._sdpa_blocks
    monkeypatch.setattr(prefops.attention, "_sdpa_blocks", lambda *args: blocks.append(args[3]) or run_blocks(*args))
    model = llama()
    batch = padded_batch(7)
    padded_loss, _ = preference_loss(model, batch, attention=attention)
    assert not blocks
    padded_grads = grads(model, padded_loss)
    flat = packed(batch)
    assert flat["input_ids"].shape[0] == 1
    loss, metrics = preference_loss(model, flat, attention=attention)
    assert len(blocks) == (BODY["num_hidden_layers"] if attention == "prefops" else 0)
    assert all(len(layout.blocks) == 2 * PAIRS for layout in blocks)
    assert model.config._attn_implementation == "eager"
    values, gradients, loss_terms = layouts_tolerances(model, batch)
    assert relative_error(loss.detach(), padded_loss.detach(), scale=loss_terms) <= values
    assert relative_error(grads(model, loss), padded_grads) <= gradients
    assert float(metrics["num_tokens/chosen"]) == float(batch["completion_mask"][:PAIRS, 1:].sum())


def test_trl_legacy_keys_with_left_padded_prompts_equal_concatenated():
    model = llama()
    batch = padded_batch(8)
    legacy = {"ref_chosen_logps": batch["ref_chosen_logps"], "ref_rejected_logps": batch["ref_rejected_logps"]}
    # Rebuild the batch from parts: prompts left-padded to 4, completions right-padded.
    starts = batch["completion_mask"].argmax(1)
    ends = batch["attention_mask"].sum(1)
    prompt = torch.zeros(PAIRS, 4, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt)
    parts = {}
    for i in range(PAIRS):
        n = int(starts[i])
        prompt[i, 4 - n:] = batch["input_ids"][i, :n]
        prompt_mask[i, 4 - n:] = 1
    for name, offset in (("chosen", 0), ("rejected", PAIRS)):
        ids = torch.zeros(PAIRS, LENGTH, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i in range(PAIRS):
            n, end = int(starts[offset + i]), int(ends[offset + i])
            ids[i, :end - n] = batch["input_ids"][offset + i, n:end]
            mask[i, :end - n] = 1
        parts[f"{name}_input_ids"], parts[f"{name}_attention_mask"] = ids, mask
    legacy.update(parts, prompt_input_ids=prompt, prompt_attention_mask=prompt_mask)
    loss, _ = preference_loss(model, legacy)
    expected_loss, _ = preference_loss(model, batch)
    values, _, loss_terms = layouts_tolerances(model, batch)
    assert relative_error(loss.detach(), expected_loss.detach(), scale=loss_terms) <= values


def test_left_padding_gets_positions_from_the_mask():
    # GPT-2's absolute position embeddings see the offset that left padding adds (RoPE would not).
    model = tiny(transformers.GPT2Config, transformers.GPT2LMHeadModel, vocab_size=VOCAB, n_embd=24, n_layer=2,
                 n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0)
    batch = padded_batch(9)
    right, _ = preference_loss(model, batch)
    shift = LENGTH - batch["attention_mask"].sum(1)
    left = {k: v for k, v in batch.items() if k.startswith("ref_")}
    for key in ("input_ids", "attention_mask", "completion_mask"):
        left[key] = torch.stack([row.roll(int(s)) for row, s in zip(batch[key], shift)])
    loss, _ = preference_loss(model, left)
    values, _, loss_terms = layouts_tolerances(model, batch)
    assert relative_error(loss.detach(), right.detach(), scale=loss_terms) <= values


def test_no_logits_sized_tensor_is_allocated():
    vocab = 1009
    model = llama(vocab_size=vocab)
    batch = padded_batch(10, pairs=2, length=24)
    batch["input_ids"] = batch["input_ids"] * 10  # spread over the larger vocabulary
    tokens = batch["input_ids"].numel()
    preference_loss(model, batch)  # the head check runs the model's own logits once; record after it
    recorder = AllocationRecorder()
    with prefops.settings(workspace=64 * 1024), recorder:
        loss, _ = preference_loss(model, batch, prefops.PreferenceLoss("sigmoid"))
        loss.backward()
    largest = max(numel for _, numel, _ in recorder.sizes)
    assert largest < tokens * vocab // 2, f"an allocation of {largest} elements (N x V = {tokens * vocab})"


def test_body_fallback_uses_output_hidden_states():
    model = llama()
    batch = padded_batch(11)
    expected = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    model.get_decoder = lambda: model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    assert any("output_hidden_states" in str(w.message) for w in caught)
    assert torch.equal(hidden, expected)


def test_hidden_states_equal_the_lm_head_input():
    model = llama()
    batch = padded_batch(12)
    caught = []
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: caught.append(args[0]))
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    assert torch.equal(final_hidden_states(model, batch["input_ids"], batch["attention_mask"]), caught[0])


@pytest.mark.parametrize("change,message", [
    (lambda b: b.pop("completion_mask"), "exactly one of completion_mask"),
    (lambda b: b.update(labels=b["input_ids"]), "exactly one of completion_mask"),
    (lambda b: b.update(ref_chosen_logps=torch.zeros(2)), r"ref_chosen_logps must have shape \[P\]"),
    (lambda b: b.pop("ref_rejected_logps"), "pass both ref_chosen_logps and ref_rejected_logps"),
    (lambda b: b.update({k: b[k][:5] for k in ("input_ids", "attention_mask", "completion_mask")}), "even number"),
    (lambda b: b.update(attention_mask=b["attention_mask"][:, :4]), "attention_mask must have the shape"),
    (lambda b: b.update(input_ids=b["input_ids"].float()), "input_ids must be an integer tensor"),
    (lambda b: b.pop("input_ids"), "batch needs input_ids"),
])
def test_bad_batches_are_refused(change, message):
    batch = padded_batch(13)
    change(batch)
    with pytest.raises((ValueError, TypeError), match=message):
        PreferenceInputs.from_batch(batch)


def test_missing_reference_and_loss_options_are_refused():
    model = llama()
    with pytest.raises(ValueError, match="needs the reference"):
        preference_loss(model, padded_batch(14, with_ref=False))
    with pytest.raises(ValueError, match="without temperature / softcap"):
        preference_loss(model, padded_batch(14), prefops.PreferenceLoss("sigmoid", softcap=30.0))
    with pytest.raises(ValueError, match="attention must be one of prefops, model; got 'flash'"):
        preference_loss(model, padded_batch(14), attention="flash")
    flat = packed(padded_batch(14))
    flat["attention_mask"] = torch.zeros_like(flat["input_ids"])
    with pytest.raises(ValueError, match="padding-free"):
        PreferenceInputs.from_batch(flat)


def test_padding_free_targets_never_cross_sequences():
    batch = packed(padded_batch(15))
    batch["completion_mask"] = torch.ones_like(batch["input_ids"])  # every token counted, so boundaries matter
    inputs = PreferenceInputs.from_batch(batch)
    ends = torch.nonzero(batch["position_ids"][0, 1:] == 0).squeeze(1)  # last token of each sequence but the final
    assert bool((inputs.targets[0, ends] == -100).all()) and int(inputs.targets[0, -1]) == -100
    lengths = padded_batch(15)["attention_mask"].sum(1)
    assert inputs.seq_ids[0].bincount().tolist() == lengths.tolist()
