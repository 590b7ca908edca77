"""The model side: build or load a causal LM, run its body, score targets straight from hidden states.

The lm_head multiplies no rows: prefops.integrations.hf gives the final hidden
states (the model's own forward with an empty logits_to_keep) and the head (the
lm_head weight plus the model's logit scaling and softcap), and they go into
linear_logprobs, which returns log p(target) without building the N x V logits
(loss_impl: fused) or by materialising them (loss_impl: reference, for checking).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import tempfile

import torch
import transformers

import prefops
import prefops.attention
from prefops import reference as reference_ops
from prefops.attention import ContextShard, PackedLayout
from prefops.integrations.hf import LMHead, final_hidden_states
from prefops.sequence_group import sequence_all_reduce
from prefops.shared_prompt import shared_prompt_hidden_states

from . import distributed
from .adapters import add_adapters
from .config import ConfigError, as_yaml, attention_implementation
from .data import IGNORE_INDEX, Batch
from .tokenizer import CharTokenizer

TINY_LLAMA = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}", "device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name}: no CUDA GPU is available to torch {torch.__version__}; "
                          "use device: cpu (or auto)", "device")
    return device


def build(config, device: torch.device, chars: str | None = None):
    """(model, tokenizer) for config.model; the tiny Llama (characters `chars`) is initialised from config.seed."""
    prefops.attention.register()
    attention = attention_implementation(config)
    if config.model == "tiny-llama":
        tokenizer = CharTokenizer(*([chars] if chars else []))
        torch.manual_seed(config.seed)
        try:
            model_config = transformers.LlamaConfig(
                **{**TINY_LLAMA, **config.model_config}, vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
            model_config._attn_implementation = attention
            model = transformers.LlamaForCausalLM(model_config)
        except Exception as error:  # noqa: BLE001 - model_config is the only input here a user gives
            raise ConfigError(f"model_config {as_yaml(config.model_config)}: {' '.join(str(error).split())}",
                              "model_config") from error
        if distributed.tensor_parallel() > 1:
            model = _tensor_parallel(model, attention)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(config.model)
        split = {"distributed_config": transformers.DistributedConfig(tp_plan="auto")} \
            if distributed.tensor_parallel() > 1 else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(
            config.model, attn_implementation=attention, **split, **config.model_config)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    if config.ofs_dpo:  # every model of the run (references, resumed runs) carries the same adapters
        model = add_adapters(model, config)
    return model.to(device), tokenizer


def _tensor_parallel(model, attention):
    """The same model loaded with transformers' tp_plan auto over all processes (DTensor weights, the lm_head
    Shard(0) over the vocabulary). transformers splits a model while it loads, so it goes through a copy on
    disk that rank 0 writes (transformers saves on rank 0 only) to its temporary directory, which the
    other ranks (of the same machine) read."""
    with tempfile.TemporaryDirectory() as own:
        directory = distributed.broadcast(own)
        model.save_pretrained(directory)
        distributed.barrier()
        split = transformers.AutoModelForCausalLM.from_pretrained(
            directory, attn_implementation=attention, dtype=model.dtype,
            distributed_config=transformers.DistributedConfig(tp_plan="auto"))
        distributed.barrier()  # every rank has read it before rank 0 removes it
    return split


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (transformers 5 renamed the switch)."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


def frozen_copy(model):
    return copy.deepcopy(model).eval().requires_grad_(False)


def weights_hash(state: dict) -> str:
    """Hash of a state dict (every parameter and buffer): the key of a reference-log-prob cache."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- the fused head

def linear_logprobs_fn(loss_impl: str):
    """prefops.linear_logprobs (fused) when the package has it, else the materialising reference."""
    if loss_impl == "fused" and hasattr(prefops, "linear_logprobs"):
        return prefops.linear_logprobs
    return reference_ops.linear_logprobs


# ----------------------------------------------------------------------------- context parallelism

@dataclasses.dataclass
class ShardedBatch(Batch):
    """A context-parallel rank's share of a packed micro-batch (context_shard). input_ids, position_ids (the
    whole sequences' values), targets and cu_seqlens (clamped to the share, so seq_ids numbers the whole
    batch's sequences) are its tokens'; what it says about examples (indices, lists, labels, ...) and its
    counts num_tokens and num_targets are the whole micro-batch's, the same on every rank of the group."""
    whole: Batch | None = None
    shard: ContextShard | None = None
    rows: torch.Tensor | None = None  # shared prompt: the row of this rank's hidden states predicting each target

    @property
    def num_tokens(self) -> int:
        return self.whole.num_tokens

    @property
    def num_targets(self) -> int:
        return self.whole.num_targets

    def completion(self, k: int) -> Batch:
        """This rank's share of the k-th completions (of a shared-prompt batch, which runs as a whole layout:
        the whole batch's k-th completions, whose targets and counts are all they are read for)."""
        part = self.whole.completion(k)
        return part if self.layout is not None else context_shard(part, self.shard.group)


def context_shard(batch: Batch, group) -> ShardedBatch:
    """This rank's contiguous share of a packed micro-batch that every rank of the context-parallel `group`
    collated: near-equal spans of its flat tokens (of a shared-prompt batch, its layout's tokens, and the
    targets whose predicting rows lie there), cut anywhere. The targets were formed on the whole sequences,
    so the token before a cut keeps its next-token target."""
    if not batch.packed:
        raise ValueError("context parallelism shares the tokens of packed batches: set packing or shared_prompt")
    fields = {field.name: getattr(batch, field.name) for field in dataclasses.fields(Batch)}
    layout = batch.layout
    if layout is None:
        shard = ContextShard.even(PackedLayout.from_cu_seqlens(batch.cu_seqlens, batch.input_ids.shape[1]), group)
        start, stop = shard.span
        return ShardedBatch(**{**fields, "input_ids": batch.input_ids[:, start:stop],
                               "targets": batch.targets[:, start:stop],
                               "position_ids": batch.position_ids[:, start:stop],
                               "cu_seqlens": batch.cu_seqlens.clamp(start, stop) - start}, whole=batch, shard=shard)
    shard = ContextShard.even(PackedLayout.from_shared_prompt(layout), group)
    start, stop = shard.span
    held = (layout.rows >= start) & (layout.rows < stop)
    rows, targets, seq_ids = layout.rows[held] - start, layout.targets[held], layout.seq_ids[held]
    if not bool(held.any()):  # a share of prompt tokens only: one ignored target, so the loss sees a sequence
        rows, targets, seq_ids = rows.new_zeros(1), targets.new_full((1,), IGNORE_INDEX), seq_ids.new_zeros(1)
    counts = torch.bincount(seq_ids, minlength=layout.num_sequences)
    return ShardedBatch(**{**fields, "input_ids": layout.input_ids.reshape(1, -1)[:, start:stop],
                           "position_ids": layout.position_ids.reshape(1, -1)[:, start:stop], "targets": targets[None],
                           "cu_seqlens": torch.nn.functional.pad(counts.cumsum(0), (1, 0)).int()},
                        whole=batch, shard=shard, rows=rows)


def sequence_group(batch: Batch):
    """The context-parallel group whose ranks share the batch's sequences (None: this rank holds them whole)."""
    return batch.shard.group if isinstance(batch, ShardedBatch) else None


def total(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The sum of per-token values over the whole batch (over the context-parallel group: each rank
    differentiates it into its own tokens)."""
    return sequence_all_reduce(values.sum(), sequence_group(batch))


def hidden_states(model, batch: Batch) -> torch.Tensor:
    """Final hidden states of the batch. Packed sequences are kept apart by their position_ids, which restart
    at 0 in each: attn_implementation prefops reads its blocks from them (no T x T mask), transformers' other
    implementations their masks.

    A shared-prompt batch gives [1, N, H]: the rows that predict its N scored tokens. A context-parallel
    share runs its tokens with prefops attention over the group (ShardedBatch)."""
    if isinstance(batch, ShardedBatch):
        hidden = final_hidden_states(model, batch.input_ids, None, batch.position_ids, prefops_layout=batch.shard)
        return hidden if batch.rows is None else hidden[:, batch.rows]
    if batch.layout is not None:
        return batch.layout.gather(shared_prompt_hidden_states(model, batch.layout))[None]
    return final_hidden_states(model, batch.input_ids, None if batch.packed else batch.attention_mask,
                               batch.position_ids)


class FusedLM(torch.nn.Module):
    """A causal LM whose every use goes body -> hidden states -> fn(hidden, LMHead), inside one forward.

    Keeping the head's use inside this module's forward is what lets FSDP2 shard it:
    with this module as the root FSDP unit, the lm_head weight (and a tied embedding)
    is all-gathered before forward and its gradient reduce-scattered after backward,
    although the lm_head module itself multiplies no rows.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, fn):
        return fn(hidden_states(self.model, batch), LMHead.of(self.model))


def as_lm(model) -> FusedLM:
    return model if isinstance(model, FusedLM) else FusedLM(model)


def head_logprobs(hidden, head: LMHead, targets, loss_impl: str) -> torch.Tensor:
    """fp32 log p(target) per position from final hidden states and the head."""
    hidden, weight, bias = head.cast(hidden)
    return linear_logprobs_fn(loss_impl)(hidden, weight, targets, bias=bias, ignore_index=IGNORE_INDEX,
                                         temperature=head.temperature, softcap=head.softcap)


def token_logprobs(model, batch: Batch, loss_impl: str) -> torch.Tensor:
    """fp32 log p(target) for every position of the batch (0 on ignored positions)."""
    return as_lm(model)(batch, lambda hidden, head: head_logprobs(hidden, head, batch.targets, loss_impl))


def ld_token_weights(batch: Batch, ld_alpha: float | None) -> torch.Tensor | None:
    """LD-DPO token weights of a padded [chosen; rejected] batch (None without ld_alpha)."""
    if ld_alpha is None:
        return None
    counted = batch.targets != IGNORE_INDEX
    pairs = batch.num_examples
    return torch.cat(prefops.losses.ld_dpo_token_weights(counted[:pairs], counted[pairs:], ld_alpha))


def sequence_sums(token_logps: torch.Tensor, batch: Batch, token_weights: torch.Tensor | None = None):
    """(weighted sums of token values, completion token counts) per sequence [S], of the whole sequences under
    context parallelism."""
    counted = batch.targets != IGNORE_INDEX
    weights = counted.float() if token_weights is None else token_weights
    if batch.packed:
        group = sequence_group(batch)
        return (sequence_all_reduce(prefops.sequence_sum(token_logps.reshape(-1), weights.reshape(-1),
                                                         cu_seqlens=batch.cu_seqlens), group),
                sequence_all_reduce(prefops.sequence_count(token_logps.reshape(-1), counted.reshape(-1),
                                                           cu_seqlens=batch.cu_seqlens), group))
    return prefops.sequence_sum(token_logps, weights), prefops.sequence_count(token_logps, counted)


def sequence_logprobs(model, batch: Batch, loss_impl: str, ld_alpha: float | None = None):
    """(summed completion log-probs, completion token counts) per sequence [S]; LD-DPO-weighted with ld_alpha."""
    return sequence_sums(token_logprobs(model, batch, loss_impl), batch, ld_token_weights(batch, ld_alpha))


@contextlib.contextmanager
def autocast(device: torch.device, bf16: str | bool, activation_offload: bool = False):
    """bf16 autocast on a GPU that supports it (bf16: auto), forced on or off otherwise; with activation_offload
    the tensors autograd saves in forward wait in CPU memory (pinned on CUDA, so the copies overlap) for backward.
    Under no_grad nothing is saved and the offload does nothing."""
    with contextlib.ExitStack() as stack:
        if activation_offload:
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda"))
        if device.type == "cuda" and (bf16 is True or (bf16 == "auto" and torch.cuda.is_bf16_supported())):
            stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
        elif bf16 is True:
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        yield
