"""Hugging Face causal LMs: final hidden states, the lm_head transform, and a one-call preference loss.

The model's own forward runs with `logits_to_keep` set to an empty index, so its
lm_head multiplies zero rows, and a forward hook on the decoder body catches the
final hidden states on the way. Going through the top-level call keeps whatever
wraps the model in the loop: DDP's gradient hooks, accelerate's autocast, PEFT
(LoRA layers, and the virtual tokens of prompt learning). The hidden states then
go with the lm_head weight, and the model's logit scaling and softcap, into the
fused op, so the N x V logits are never built.

    loss, metrics = preference_loss(model, batch, prefops.PreferenceLoss("sigmoid", beta=0.1))
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import warnings
import weakref

import torch

from .. import attention as packed_attention
from .. import reference, vocab_parallel
from ..losses import ld_dpo_token_weights
from ..ops import linear_logprobs
from ..preference import PreferenceLoss
from ..sequences import sequence_sum
from ..versions import TRANSFORMERS_PACKED, require

__all__ = ["LMHead", "PreferenceInputs", "check_head", "completion_logps", "final_hidden_states", "fused_loss",
           "head_call", "preference_loss", "unwrap_model"]


def unwrap_model(model):
    """The transformers PreTrainedModel inside DDP / DeepSpeed / torch.compile / PEFT wrappers."""
    import transformers

    seen = model
    while not isinstance(model, transformers.PreTrainedModel):
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, FSDP1, DeepSpeed
            model = model.module
        else:
            raise TypeError(f"expected a transformers causal LM (possibly wrapped by PEFT, DDP, DeepSpeed or "
                            f"torch.compile); got {type(seen).__name__}")
    return model


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# ----------------------------------------------------------------------------- the lm_head transform

@dataclasses.dataclass
class LMHead:
    """What turns a final hidden state into logits: z = softcap tanh((h W^T + b) / temperature / softcap).

    `LMHead.of(model)` reads the output embedding (the tied input embedding when
    tie_word_embeddings) and the config's logit scaling: Cohere's logit_scale,
    Granite's logits_scaling (divides; HyperCLOVA X multiplies), Falcon-H1's
    lm_head_multiplier, Muse Glimmer's output_multiplier, and Gemma-style
    final_logit_softcapping. `check_head(model)` confirms it against the model's
    own logits on a few tokens, for architectures this table does not know.
    """
    weight: torch.Tensor = dataclasses.field(repr=False)
    bias: torch.Tensor | None = dataclasses.field(repr=False)
    temperature: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model) -> "LMHead":
        base = unwrap_model(model)
        output = base.get_output_embeddings()
        if output is None or not isinstance(getattr(output, "weight", None), torch.Tensor):
            raise ValueError(f"{type(base).__name__} has no output embedding (get_output_embeddings() gave "
                             f"{type(output).__name__}): it is not a causal LM with an lm_head")
        _refuse_head_adapter(output)
        config = _text_config(base)
        return cls(output.weight, getattr(output, "bias", None), 1.0 / _logit_scale(config),
                   getattr(config, "final_logit_softcapping", None) or None)

    def cast(self, hidden: torch.Tensor):
        """(hidden, weight, bias) in one dtype: autocast's when on (as the lm_head GEMM would run), else the weight's."""
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return hidden.to(dtype), self.weight.to(dtype), bias

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The materialised logits (for checks and references only); a vocabulary-sharded (tensor-parallel)
        head computes its rows' logits and all-gathers them."""
        shard = vocab_parallel.shard_of(self.weight, self.bias)
        weight, bias = (self.weight, self.bias) if shard is None else (shard.weight, shard.bias)
        logits = reference.logits(hidden, weight.to(hidden.dtype), temperature=self.temperature, softcap=self.softcap,
                                  bias=None if bias is None else bias.to(hidden.dtype))
        return logits if shard is None else vocab_parallel.gather_vocab(logits, shard)


def head_call(model, hidden: torch.Tensor, fn, head: LMHead | None = None):
    """fn(hidden, head), head defaulting to LMHead.of(model): where the fused op meets the lm_head weight.

    Under DeepSpeed ZeRO-3 the weight is partitioned (an empty tensor) outside its module's own call,
    so fn runs as the output embedding's forward: ZeRO-3's hooks gather the weight for that call, gather
    it again when backward reaches the call's outputs, and hand the weight's gradient to its
    reduce-scatter, as for any layer. Other models call fn directly.
    """
    output = unwrap_model(model).get_output_embeddings()
    weight = getattr(output, "weight", None)
    if not hasattr(weight, "ds_id"):  # the attributes ZeRO-3 gives each parameter it partitions
        return fn(hidden, LMHead.of(model) if head is None else head)

    output.forward = lambda states: fn(states, LMHead.of(model) if head is None else head)
    try:
        return output(hidden)
    finally:
        del output.forward


def _logit_scale(config) -> float:
    scale = 1.0
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None and not isinstance(value, bool):
            scale *= float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        scale *= float(scaling) if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / float(scaling)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the config's logit scaling gives a factor of {scale}; expected a finite number > 0")
    return scale


def _refuse_head_adapter(output) -> None:
    # The fused op reads lm_head.weight directly, so an adapter on the head would be ignored and never trained.
    if hasattr(output, "base_layer") or hasattr(output, "modules_to_save"):
        raise ValueError("a PEFT adapter (or modules_to_save) on the lm_head is not supported: the fused loss reads "
                         "lm_head.weight directly, so the adapter would be ignored. Remove 'lm_head' from "
                         "target_modules / modules_to_save.")


@torch.no_grad()
def check_head(model, head: LMHead | None = None) -> LMHead:
    """Run the model on a few tokens and check that `head` (default LMHead.of(model)) reproduces its logits.

    A forward pre-hook on the lm_head catches its input from the same forward, so
    dropout and the body play no part: only the hidden -> logits transform is tested.
    Raises ValueError naming the mismatch; returns the head.
    """
    base = unwrap_model(model)
    head = LMHead.of(model) if head is None else head
    caught = []
    vocab = getattr(head.weight, "ds_shape", head.weight.shape)[0]  # ZeRO-3 keeps a partitioned weight's shape there
    handle = base.get_output_embeddings().register_forward_pre_hook(lambda module, args: caught.append(args[0]))
    try:
        ids = torch.arange(3, device=head.weight.device)[None] % vocab
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    if len(caught) != 1 or logits is None or logits.shape[-1] != vocab:
        raise ValueError(f"could not observe {type(base).__name__}'s lm_head: it was called {len(caught)} times "
                         "in one forward; the fused head cannot be checked for this model")
    expected = logits.float()
    got = head_call(model, caught[0].float(), lambda hidden, head: head.logits(hidden), head)
    scale = float(expected.abs().max().clamp_min(1.0))
    tolerance = 1e-4 if logits.dtype == torch.float32 else 3e-2
    error = float((got - expected).abs().max()) / scale
    if not error <= tolerance:
        raise ValueError(
            f"the fused head (temperature={head.temperature}, softcap={head.softcap}) does not reproduce "
            f"{type(base).__name__}'s logits (max error {error:.2e} of the largest logit): its forward transforms "
            "the logits in a way LMHead.of does not read from the config; build the LMHead yourself")
    return head


# ----------------------------------------------------------------------------- final hidden states

def _body(base):
    """The decoder body whose output is the lm_head's input, or None when get_decoder() does not give one."""
    try:
        body = base.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if not isinstance(body, torch.nn.Module) or body is base:
        return None
    return body


def _accepts(base, name: str) -> bool:
    parameters = inspect.signature(type(base).forward).parameters
    return name in parameters


_WARNED = set()


def _warn_once(key, message):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


def _forward(model, input_ids, attention_mask=None, position_ids=None, **model_kwargs):
    """(final hidden states [B, T, H], the model's output) from one top-level call of `model`."""
    base = unwrap_model(model)
    kwargs = dict(model_kwargs, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if _accepts(base, "logits_to_keep"):
        kwargs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=input_ids.device)
    else:
        _warn_once(("logits", type(base)), f"{type(base).__name__}.forward has no logits_to_keep, so its own lm_head "
                   "builds the full logits in every forward; the fused loss still avoids a second copy")
    body = _body(base)
    with _empty_sharded_head(base):
        return _run_forward(model, base, body, kwargs, input_ids)


@contextlib.contextmanager
def _empty_sharded_head(base):
    """A vocabulary-sharded (tensor-parallel) lm_head given zero rows returns its empty output directly:
    DTensor's sharding propagation of the zero-row GEMM divides by zero (torch 2.13)."""
    output = base.get_output_embeddings()
    if output is None or not vocab_parallel.is_dtensor(getattr(output, "weight", None)):
        yield
        return
    forward, own = output.forward, vars(output).get("forward")  # own: transformers' tensor-parallel forward

    def skip_empty(hidden, *args, **kwargs):
        if hidden.shape[-2] == 0:
            return hidden.new_zeros(*hidden.shape[:-1], output.weight.shape[0])
        return forward(hidden, *args, **kwargs)

    output.forward = skip_empty
    try:
        yield
    finally:
        if own is None:
            del output.forward
        else:
            output.forward = own


def _run_forward(model, base, body, kwargs, input_ids):
    if body is None:
        # All layers' outputs are returned, not only the last: in training autograd keeps them anyway,
        # but under no_grad (reference models) this holds L x N x H activations instead of N x H.
        _warn_once(("body", type(base)), f"{type(base).__name__}.get_decoder() gives no body module; final hidden "
                   "states come from output_hidden_states=True, which keeps every layer's output")
        output = model(**kwargs, output_hidden_states=True)
        hidden = output.hidden_states[-1]
    else:
        caught = []

        def catch(module, args, out):
            caught.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

        handle = body.register_forward_hook(catch)
        try:
            output = model(**kwargs)
        finally:
            handle.remove()
        if len(caught) != 1:
            raise RuntimeError(f"{type(base).__name__}'s body ran {len(caught)} times in one forward; expected once")
        hidden = caught[0]
    # Prompt-learning PEFT prepends virtual tokens: keep the positions of the real ones.
    return hidden[:, -input_ids.shape[-1]:], output


def final_hidden_states(model, input_ids, attention_mask=None, position_ids=None, **model_kwargs) -> torch.Tensor:
    """Final hidden states [B, T, H] (after the final norm: the lm_head's input) of any causal LM.

    `model` is called as usual (DDP, accelerate and PEFT wrappers included) with
    logits_to_keep = an empty index, so its lm_head does no work; the states are
    caught from the body (model.get_decoder()). Models without a separate body fall
    back to output_hidden_states=True, which keeps every layer's output (a warning
    says so). Padding-free batches: input_ids [1, N], position_ids restarting at 0
    for each sequence and attention_mask=None; transformers (>= 4.54) then keeps the
    sequences from attending to each other.
    """
    return _forward(model, input_ids, attention_mask, position_ids, **model_kwargs)[0]


# ----------------------------------------------------------------------------- preference batches

@dataclasses.dataclass
class PreferenceInputs:
    """A preference batch in one layout: 2P sequences, pair i = sequences i (chosen) and P + i (rejected).

    input_ids [B, T]; targets [B, T]: the token position t predicts (ignore_index off the
    completions and at each sequence's last position). Padded: B = 2P rows. Padding-free:
    B = 1, seq_ids [1, T] gives each token's sequence, position_ids restart per sequence.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    targets: torch.Tensor
    seq_ids: torch.Tensor | None
    pairs: int
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None

    @property
    def padding_free(self) -> bool:
        return self.seq_ids is not None

    @classmethod
    def from_batch(cls, batch, ignore_index: int = -100) -> "PreferenceInputs":
        """Read a batch in any of the formats of `preference_loss`; clear errors otherwise."""
        if not hasattr(batch, "keys"):
            raise TypeError(f"batch must be a dict of tensors; got {type(batch).__name__}")
        if "chosen_input_ids" in batch:
            batch = _concatenate_pairs(batch)
        if "input_ids" not in batch:
            raise ValueError(f"batch needs input_ids (+ completion_mask or labels), or prompt_input_ids / "
                             f"chosen_input_ids / rejected_input_ids; got keys {sorted(batch.keys())}")
        input_ids = _integer(batch["input_ids"], "input_ids")
        has_mask, has_labels = "completion_mask" in batch, "labels" in batch
        if has_mask == has_labels:
            raise ValueError("batch needs exactly one of completion_mask (1 on completion tokens) and labels "
                             f"(ignore_index off the completions); got {'both' if has_mask else 'neither'}")
        position_ids = batch.get("position_ids")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [2P, T] (padded) or [1, N] / [N] (padding-free); "
                             f"got shape {tuple(batch['input_ids'].shape)}")
        shape = tuple(input_ids.shape)
        if has_mask:
            completion = _reshaped(batch["completion_mask"], shape, "completion_mask").bool()
            labels = input_ids.masked_fill(~completion, ignore_index)
        else:
            labels = _integer(_reshaped(batch["labels"], shape, "labels"), "labels")
        padding_free = position_ids is not None and shape[0] == 1
        attention_mask = batch.get("attention_mask")
        if padding_free:
            _check_packed_attention()
            position_ids = _integer(_reshaped(position_ids, shape, "position_ids"), "position_ids")
            if attention_mask is not None and not bool(_reshaped(attention_mask, shape, "attention_mask").all()):
                raise ValueError("a padding-free batch (input_ids [1, N] with position_ids) has no padding: "
                                 "attention_mask must be absent or all ones")
            # A sequence starts wherever the position does not follow on by one, as transformers reads it.
            starts = torch.ones_like(position_ids, dtype=torch.bool)
            starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
            seq_ids = starts.long().cumsum(1) - 1
            num_sequences = int(seq_ids[0, -1]) + 1
            attention_mask = None
            # The last token of a sequence predicts nothing: the next token belongs to another sequence.
            same = torch.zeros_like(starts)
            same[:, :-1] = ~starts[:, 1:]
        else:
            seq_ids = None
            num_sequences = shape[0]
            if attention_mask is not None:
                attention_mask = _reshaped(attention_mask, shape, "attention_mask")
                if position_ids is None and not bool(attention_mask[:, 0].all()):
                    # Left padding: each row's positions must start at its first token, not at column 0.
                    position_ids = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
            same = torch.ones_like(labels, dtype=torch.bool)
            same[:, -1] = False
        if num_sequences % 2 or num_sequences == 0:
            raise ValueError(f"expected an even number of sequences [chosen_0..chosen_P-1, rejected_0..rejected_P-1]; "
                             f"got {num_sequences}")
        targets = torch.full_like(labels, ignore_index)
        targets[:, :-1] = labels[:, 1:]
        targets = targets.masked_fill(~same, ignore_index)
        pairs = num_sequences // 2
        ref = [batch.get(name) for name in ("ref_chosen_logps", "ref_rejected_logps")]
        if (ref[0] is None) != (ref[1] is None):
            raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
        for name, value in zip(("ref_chosen_logps", "ref_rejected_logps"), ref):
            if value is not None and tuple(value.shape) != (pairs,):
                raise ValueError(f"{name} must have shape [P] = ({pairs},); got {tuple(value.shape)}")
        return cls(input_ids, attention_mask, position_ids, targets, seq_ids, pairs, *ref)

    def token_weights(self, ld_alpha, ignore_index: int = -100):
        """LD-DPO token weights [B, T] (None without ld_alpha); padded layout only."""
        if ld_alpha is None:
            return None
        if self.padding_free:
            raise ValueError("ld_alpha needs the padded [chosen; rejected] layout, not a padding-free batch")
        counted = self.targets != ignore_index
        return torch.cat(ld_dpo_token_weights(counted[:self.pairs], counted[self.pairs:], ld_alpha))


def _check_packed_attention():
    require("transformers", TRANSFORMERS_PACKED, "a padding-free batch (position_ids restarting at 0 for each "
            "sequence, kept apart by transformers; or pass a padded batch)")


def _integer(value, name):
    if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor; got "
                        f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
    return value


def _reshaped(value, shape, name):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor; got {type(value).__name__}")
    if value.numel() != math.prod(shape) or (value.dim() == 2 and tuple(value.shape) != shape):
        raise ValueError(f"{name} must have the shape of input_ids {shape}; got {tuple(value.shape)}")
    return value.reshape(shape)


def _concatenate_pairs(batch):
    """prompt/chosen/rejected tensors (TRL < 1.0 collator keys) -> input_ids [2P, T] + completion_mask, flushed left."""
    names = [f"{part}_input_ids" for part in ("prompt", "chosen", "rejected")]
    missing = [name for name in names if name not in batch]
    if missing:
        raise ValueError(f"batch with chosen_input_ids also needs {missing}")
    ids = [_integer(batch[name], name) for name in names]
    masks = []
    for name, value in zip(names, ids):
        if value.dim() != 2 or value.shape[0] != ids[0].shape[0]:
            raise ValueError(f"{name} must be [P, T] with P = {ids[0].shape[0]}; got {tuple(value.shape)}")
        mask_name = name.replace("input_ids", "attention_mask")
        mask = batch.get(mask_name)
        masks.append(torch.ones_like(value, dtype=torch.bool) if mask is None else
                     _reshaped(mask, tuple(value.shape), mask_name).bool())
    prompt, prompt_mask = ids[0], masks[0]
    rows = torch.cat([torch.cat([prompt, ids[i]], 1) for i in (1, 2)])
    keep = torch.cat([torch.cat([prompt_mask, masks[i]], 1) for i in (1, 2)])
    completion = torch.cat([torch.cat([torch.zeros_like(prompt_mask), masks[i]], 1) for i in (1, 2)])
    # Move each row's kept tokens to its start (prompt left padding and completion right padding in one row).
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)
    width = int(keep.sum(1).max())
    out = {key: value for key, value in batch.items() if key.startswith("ref_")}
    out["input_ids"] = rows.gather(1, order)[:, :width]
    out["attention_mask"] = keep.gather(1, order)[:, :width].long()
    out["completion_mask"] = (completion & keep).gather(1, order)[:, :width].long()
    return out


# ----------------------------------------------------------------------------- losses

def completion_logps(model, inputs: PreferenceInputs, *, ld_alpha=None, ignore_index: int = -100,
                     head: LMHead | None = None) -> torch.Tensor:
    """Summed completion log-probs per sequence [2P] (LD-DPO weighted with ld_alpha), on the fused path.

    Differentiable when called with grad; under torch.no_grad() the fused op saves
    nothing (the reference-model path).
    """
    hidden = final_hidden_states(model, inputs.input_ids, inputs.attention_mask, inputs.position_ids)
    token = head_call(model, hidden, lambda hidden, head: _logprobs(hidden, head, inputs.targets, ignore_index), head)
    weights = inputs.token_weights(ld_alpha, ignore_index)
    counted = inputs.targets != ignore_index
    weights = counted if weights is None else weights
    if inputs.padding_free:
        return sequence_sum(token.reshape(-1), weights.reshape(-1), seq_ids=inputs.seq_ids.reshape(-1),
                            num_sequences=2 * inputs.pairs)
    return sequence_sum(token, weights)


def _logprobs(hidden, head: LMHead, targets, ignore_index: int = -100) -> torch.Tensor:
    """Per-token log p(target) through `head`, in the dtype it casts to (the fused op of every integration)."""
    hidden, weight, bias = head.cast(hidden)
    return linear_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                           temperature=head.temperature, softcap=head.softcap)


def _peft_reference(model):
    """A context that turns a PEFT model into its reference: the 'ref' adapter if there is one, else no adapter."""
    peft_model = model
    while not hasattr(peft_model, "disable_adapter"):
        inner = getattr(peft_model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return None
        peft_model = inner
    if "ref" in getattr(peft_model, "peft_config", {}):
        return _UseAdapter(peft_model, "ref")
    return peft_model.disable_adapter()


class _UseAdapter:
    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        self.previous = self.model.active_adapter
        self.model.set_adapter(self.name)

    def __exit__(self, *exc):
        self.model.set_adapter(self.previous)


def _loss_for_head(loss: PreferenceLoss, head: LMHead) -> PreferenceLoss:
    """`loss` with the model's temperature and softcap (the loss itself must leave them at their defaults)."""
    if loss.options["temperature"] != 1.0 or loss.options["softcap"] is not None:
        raise ValueError("preference_loss takes the logit scaling and softcap from the model: build the "
                         "PreferenceLoss without temperature / softcap")
    if head.temperature == 1.0 and head.softcap is None:
        return loss
    fused = copy.copy(loss)
    fused.options = dict(loss.options, temperature=head.temperature, softcap=head.softcap)
    return fused


_CHECKED = weakref.WeakKeyDictionary()
ATTENTION = ("prefops", "model")
# Implementations whose packed path is a T x T mask; others (flash, flex, prefops, custom) are left as they are.
_MASKED = ("sdpa", "eager")


def _configs(config):
    """A config and its sub-configs, at any depth."""
    found, stack = [], [config]
    while stack:
        config = stack.pop()
        found.append(config)
        stack += [sub for key in getattr(config, "sub_configs", {}) if (sub := getattr(config, key, None)) is not None]
    return found


@contextlib.contextmanager
def _attention_for(models, inputs: PreferenceInputs, attention: str):
    """Within it, models on sdpa or eager run a padding-free batch with prefops attention (no T x T mask)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}; got {attention!r}")
    configs = [unwrap_model(m).config for m in models if m is not None] if inputs.padding_free else []
    configs = [config for config in configs if config._attn_implementation in _MASKED] if attention == "prefops" else []
    saved = [(sub, sub._attn_implementation_internal) for config in configs for sub in _configs(config)]
    if configs:
        packed_attention.register()
    for config in configs:
        config._attn_implementation = packed_attention.NAME
    try:
        yield
    finally:
        for sub, value in saved:
            sub._attn_implementation_internal = value


def preference_loss(model, batch, loss: PreferenceLoss | None = None, *, ref_model=None, check: bool = True,
                    attention: str = "prefops"):
    """(loss, metrics) of a preference batch for any transformers causal LM, without the N x V logits.

    Args:
        model: an AutoModelForCausalLM, possibly PEFT-wrapped (LoRA on the body; not on the
            lm_head) or wrapped by DDP / accelerate. Tied embeddings, logit scaling and
            final-logit softcapping are read from the model (see LMHead).
        batch: a dict in one of these formats; pair i is sequences i (chosen) and P + i (rejected):
            * padded, as TRL's DataCollatorForPreference: input_ids [2P, T] = [chosen; rejected]
              (prompt + completion), attention_mask [2P, T], and completion_mask [2P, T]
              (1 on completion tokens) or labels [2P, T] (-100 off the completions, unshifted:
              labels[t] is token t). Left or right padding.
            * separate (TRL's older keys): prompt_input_ids [P, Tp], chosen_input_ids [P, Tc],
              rejected_input_ids [P, Tr] with their *_attention_mask (any padding).
            * padding-free: input_ids [1, N] (or [N]) holding the 2P sequences back to back in the
              order chosen_0..chosen_P-1, rejected_0..rejected_P-1, position_ids [1, N] restarting
              at 0 for each sequence, completion_mask or labels [1, N], no attention_mask.
            Optional: ref_chosen_logps, ref_rejected_logps [P] (precomputed reference sums,
            LD-DPO weighted when the loss has ld_alpha).
        loss: a prefops.PreferenceLoss (default DPO sigmoid, beta 0.1) without temperature/softcap.
        ref_model: the frozen reference, run forward-only under no_grad. Without it and without
            ref_*_logps in the batch, a PEFT model is its own reference with the adapters off
            (its 'ref' adapter when it has one, as TRL); other models raise.
        check: on the first call for a model, confirm the fused head against the model's own
            logits on 3 tokens (check_head).
        attention: "prefops" runs a padding-free batch on a model (and ref_model) whose attention is sdpa or
            eager with attn_implementation="prefops" for this call (prefops.attention: no T x T mask, same
            values), restored after; "model" keeps the model's own, which builds the T x T mask.

    Returns the mean loss over pairs and metrics under TRL's names (rewards/chosen,
    rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, ...).
    """
    loss = PreferenceLoss("sigmoid", beta=0.1) if loss is None else loss
    if not isinstance(loss, PreferenceLoss):
        raise TypeError(f"loss must be a prefops.PreferenceLoss; got {type(loss).__name__}")
    ignore_index = loss.options["ignore_index"]
    inputs = PreferenceInputs.from_batch(batch, ignore_index)
    head = LMHead.of(model)
    if check and unwrap_model(model) not in _CHECKED:
        check_head(model, head)
        _CHECKED[unwrap_model(model)] = True
    with _attention_for((model, ref_model), inputs, attention):
        if loss.needs_reference and inputs.ref_chosen_logps is None:
            reference_context = None if ref_model is not None else _peft_reference(model)
            if ref_model is None and reference_context is None:
                raise ValueError(f"loss_type {loss.loss_type!r} needs the reference: pass ref_model, or "
                                 "ref_chosen_logps / ref_rejected_logps in the batch (or use a PEFT model)")
            with torch.no_grad(), reference_context or contextlib.nullcontext():
                ref = completion_logps(ref_model or model, inputs, ld_alpha=loss.ld_alpha, ignore_index=ignore_index)
            inputs.ref_chosen_logps, inputs.ref_rejected_logps = ref[:inputs.pairs], ref[inputs.pairs:]
        return fused_loss(model, inputs, loss, head)[:2]


def fused_loss(model, inputs: PreferenceInputs, loss: PreferenceLoss, head: LMHead | None = None, **model_kwargs):
    """(loss, metrics, the model's output) for inputs that already hold the reference log-probs if the loss needs them.

    model_kwargs go to the model's forward (e.g. output_router_logits=True for the MoE aux loss).
    """
    hidden, output = _forward(model, inputs.input_ids, inputs.attention_mask, inputs.position_ids, **model_kwargs)

    def fused(hidden, head):
        hidden, weight, bias = head.cast(hidden)
        return _loss_for_head(loss, head)(hidden, weight, inputs.targets, bias=bias, seq_ids=inputs.seq_ids,
                                          ref_chosen_logps=inputs.ref_chosen_logps,
                                          ref_rejected_logps=inputs.ref_rejected_logps)
    value, metrics = head_call(model, hidden, fused, head)
    return value, metrics, output
