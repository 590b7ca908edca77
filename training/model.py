"""The model side: build or load a causal LM, run its body, score targets straight from hidden states.

The lm_head is never called. The decoder body gives final hidden states; they go
with the lm_head weight (plus the model's logit scaling and softcap) into
linear_logprobs, which returns log p(target) without building the N x V logits
(loss_impl: fused) or by materialising them (loss_impl: reference, for checking).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib

import torch
import transformers

import prefops
from prefops import reference as reference_ops

from .data import IGNORE_INDEX, Batch
from .tokenizer import CharTokenizer

TINY_LLAMA = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build(config, device: torch.device, chars: str | None = None):
    """(model, tokenizer) for config.model; the tiny Llama (characters `chars`) is initialised from config.seed."""
    if config.model == "tiny-llama":
        tokenizer = CharTokenizer(*([chars] if chars else []))
        model_config = transformers.LlamaConfig(
            **{**TINY_LLAMA, **config.model_config}, vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id)
        model_config._attn_implementation = config.attn_implementation
        torch.manual_seed(config.seed)
        model = transformers.LlamaForCausalLM(model_config)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(config.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            config.model, attn_implementation=config.attn_implementation, **config.model_config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device), tokenizer


def frozen_copy(model):
    return copy.deepcopy(model).eval().requires_grad_(False)


def weights_hash(model) -> str:
    """Hash of every parameter and buffer: the key of a reference-log-prob cache."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- the fused head

@dataclasses.dataclass
class Head:
    """What turns a final hidden state into logits, read from the model and its config."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    temperature: float
    softcap: float | None

    @classmethod
    def of(cls, model) -> "Head":
        text_config = model.config.get_text_config()
        output = model.get_output_embeddings()  # the tied embedding when tie_word_embeddings
        temperature = 1.0
        # Cohere-style models multiply the logits by logit_scale; Granite divides by logits_scaling.
        if getattr(text_config, "logit_scale", None):
            temperature /= text_config.logit_scale
        if getattr(text_config, "logits_scaling", None):
            temperature *= text_config.logits_scaling
        return cls(output.weight, getattr(output, "bias", None), temperature,
                   getattr(text_config, "final_logit_softcapping", None) or None)


def linear_logprobs_fn(loss_impl: str):
    """prefops.linear_logprobs (fused) when the package has it, else the materialising reference."""
    if loss_impl == "fused" and hasattr(prefops, "linear_logprobs"):
        return prefops.linear_logprobs
    return reference_ops.linear_logprobs


def _packed_attention_mask(batch: Batch, model) -> torch.Tensor | None:
    """Block-diagonal causal mask [1, 1, N, N], so packed sequences cannot attend to each other.

    flash-attn's varlen kernels find the sequence boundaries from position_ids, so they get no mask.
    """
    implementation = model.config._attn_implementation or "eager"
    if implementation.startswith("flash"):
        return None
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    allowed = (seq_ids[:, None] == seq_ids[None, :]).tril()[None, None]
    if implementation == "eager":  # eager attention adds the mask to the scores
        dtype = next(model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return allowed


def hidden_states(model, batch: Batch) -> torch.Tensor:
    body = model.get_decoder()
    mask = _packed_attention_mask(batch, model) if batch.packed else batch.attention_mask
    output = body(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, use_cache=False)
    return output.last_hidden_state


def token_logprobs(model, batch: Batch, loss_impl: str) -> torch.Tensor:
    """fp32 log p(target) for every position of the batch (0 on ignored positions)."""
    hidden = hidden_states(model, batch)
    head = Head.of(model)
    weight, bias = head.weight, head.bias
    device_type = hidden.device.type
    # The fused op wants one dtype: that of autocast when on (as the lm_head GEMM would run), else the weight's.
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    return linear_logprobs_fn(loss_impl)(hidden, weight, batch.targets, bias=bias, ignore_index=IGNORE_INDEX,
                                         temperature=head.temperature, softcap=head.softcap)


def sequence_logprobs(model, batch: Batch, loss_impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-probs, completion token counts) per sequence [S]."""
    logps = token_logprobs(model, batch, loss_impl)
    counted = batch.targets != IGNORE_INDEX
    if batch.packed:
        layout = dict(cu_seqlens=batch.cu_seqlens)
        logps, counted = logps.reshape(-1), counted.reshape(-1)
    else:
        layout = {}
    return (prefops.sequence_sum(logps, counted, **layout), prefops.sequence_count(logps, counted, **layout))


def autocast(device: torch.device, bf16: str | bool):
    """bf16 autocast on a GPU that supports it (bf16: auto), forced on or off otherwise."""
    if device.type == "cuda" and (bf16 is True or (bf16 == "auto" and torch.cuda.is_bf16_supported())):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if bf16 is True:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
