"""Attention over packed layouts without a T x T mask: `attn_implementation="prefops"` for transformers.

A packed batch holds several sequences in one row. The masked way to keep them
apart builds a [T, T] mask (bool for SDPA, additive for eager) or a FlexAttention
BlockMask: quadratic memory before any score. Here the layout is a list of
blocks, contiguous query spans that partition the flattened [B * T] tokens; a
block attends causally to itself and, when it has a parent, fully to the
parent's tokens before it. Attention then runs block by block, never over the
whole pack:

  * flash-attn's varlen kernel when `flash_attn` is importable and the tensors
    are fp16/bf16 on CUDA: one call; a block's keys are [parent; own], gathered
    once per layer (the kernel's causal mask is bottom-right aligned);
  * otherwise torch SDPA per block, is_causal=True, or
    torch.nn.attention.bias.causal_lower_right where the keys are longer than
    the queries (a response's queries against [prompt; response] keys).

The prompt's keys and values are a piece of one `split` that every response
block reads, so autograd sums their gradients over the responses.

Context parallelism, one long pack shared by a process group: a ContextShard says
which consecutive span of the pack's flat tokens each rank holds (cut anywhere, so
a sequence may straddle ranks). Each rank runs its own tokens; every layer
all-gathers keys and values along the sequence (backward: a reduce-scatter of their
gradients), and the pieces of blocks among the rank's queries attend to their keys
as above. torch's context_parallel (ring attention) takes no attention bias, so it
cannot keep packed sequences apart; this path needs none.

    whole = PackedLayout.from_position_ids(positions)          # positions [1, N] of the whole pack
    shard = prefops.attention.ContextShard.even(whole, group)  # near-equal spans over the group's ranks
    start, stop = shard.span
    model(input_ids=ids[:, start:stop], position_ids=positions[:, start:stop], prefops_layout=shard)

How a layout reaches the attention. transformers 5 passes the keyword arguments
of `model(...)` down to the attention function of every layer (gradient
checkpointing re-runs replay them), so:

    import prefops.attention
    prefops.attention.register()          # once: attn_implementation="prefops" becomes valid
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="prefops")
    # padding-free, transformers' own convention: position_ids restart at 0 per sequence
    model(input_ids=ids, position_ids=positions)                           # ids [1, N]
    # a shared prompt (prefops.shared_prompt.build_layout), no attention_mask:
    model(input_ids=layout.input_ids, position_ids=layout.position_ids, prefops_layout=layout)

The blocks come, in this order, from `prefops_layout` (a SharedPromptLayout or
a PackedLayout), from transformers' flash kwargs cu_seq_lens_q / cu_seq_lens_k
(DataCollatorWithFlattening(return_flash_attn_kwargs=True)), or from
position_ids, where a sequence starts wherever the position does not follow on
by one (as transformers' masks read it). They are derived once per forward:
every layer receives the same tensor or layout object, and the last one derived
is kept.

Padded batches (an attention_mask with a 0), caches (keys longer than queries),
non-causal layers, and masks transformers modifies beyond causal, packing and a
sliding window (VLM image blocks, chunked attention) get the mask transformers
builds for SDPA and run through its SDPA function, as `attn_implementation="sdpa"`
would. A sliding window is read from the `sliding_window` argument the layer
passes, as flash_attention_2 reads it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import threading
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .versions import TRANSFORMERS_ATTENTION, require

NAME = "prefops"
LAYOUT_KWARG = "prefops_layout"


@dataclasses.dataclass(frozen=True, eq=False)
class PackedLayout:
    """The blocks of a [rows, length] batch, flattened to rows * length tokens.

    blocks[i] = (start, end, parent): queries start..end-1 attend causally to
    themselves and fully to block `parent`'s tokens (-1: none). The blocks
    partition the tokens in order, each within one row; a parent comes earlier
    in the same row and has no parent itself.
    """
    rows: int
    length: int
    blocks: tuple
    _plans: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        expected = 0
        for i, (start, end, parent) in enumerate(self.blocks):
            if start != expected or end <= start or (end - 1) // self.length != start // self.length:
                raise ValueError(f"blocks must partition the {self.rows} x {self.length} tokens in order, each "
                                 f"within one row; block {i} is ({start}, {end}) after token {expected}")
            if parent != -1 and not (0 <= parent < i and self.blocks[parent][2] == -1
                                     and self.blocks[parent][0] // self.length == start // self.length):
                raise ValueError(f"block {i}'s parent must be an earlier block of its row without a parent; "
                                 f"got {parent}")
            expected = end
        if expected != self.rows * self.length:
            raise ValueError(f"blocks cover {expected} tokens; the batch has {self.rows} x {self.length}")

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> "PackedLayout":
        """One causal block per sequence: a sequence starts where the position does not follow on by one."""
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [B, T]; got shape {tuple(position_ids.shape)}")
        rows, length = position_ids.shape
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        return cls._sequences(rows, length, starts.reshape(-1).nonzero().squeeze(1).tolist())

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, length: int) -> "PackedLayout":
        """One causal block per sequence of a single row, from flash-attn's cumulative lengths [S + 1]."""
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != length or any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seq_lens must rise strictly from 0 to the {length} tokens of the row; got {bounds}")
        return cls._sequences(1, length, bounds[:-1])

    @classmethod
    def _sequences(cls, rows, length, starts):
        bounds = sorted(set(starts) | set(range(0, rows * length, length))) + [rows * length]
        return cls(rows, length, tuple((a, b, -1) for a, b in zip(bounds, bounds[1:])))

    @classmethod
    def from_shared_prompt(cls, layout) -> "PackedLayout":
        """Blocks of a prefops.shared_prompt layout: each prompt, then each response with the prompt as parent.
        Padding is one causal block per run, as the layout's dense mask treats it."""
        document, branch = layout.document_ids, layout.branch_ids
        rows, length = document.shape
        change = torch.ones_like(document, dtype=torch.bool)
        change[:, 1:] = (document[:, 1:] != document[:, :-1]) | (branch[:, 1:] != branch[:, :-1])
        starts = change.reshape(-1).nonzero().squeeze(1)
        documents = document.reshape(-1)[starts].tolist()
        branches = branch.reshape(-1)[starts].tolist()
        bounds = starts.tolist() + [rows * length]
        blocks, prompt_of = [], {}
        for i, (doc, part) in enumerate(zip(documents, branches)):
            if part == 0:
                prompt_of[doc] = len(blocks)
            elif doc >= 0 and doc not in prompt_of:
                raise ValueError(f"shared-prompt layout: a response of example {doc} comes before its prompt")
            blocks.append((bounds[i], bounds[i + 1], prompt_of[doc] if part > 0 and doc >= 0 else -1))
        return cls(rows, length, tuple(blocks))

    def segments(self, start: int = 0, stop: int | None = None) -> tuple:
        """The pieces of blocks among the tokens start..stop-1 (default all), as (first, last, key_spans): queries
        first..last-1 attend to the tokens of key_spans (the parent's, then their block's up to `last`), of which
        they are the last."""
        stop = self.rows * self.length if stop is None else stop
        if ("segments", start, stop) not in self._plans:
            found = []
            for begin, end, parent in self.blocks:
                first, last = max(begin, start), min(end, stop)
                if first < last:
                    found.append((first, last, ((self.blocks[parent][:2],) if parent != -1 else ()) + ((begin, last),)))
            self._plans["segments", start, stop] = tuple(found)
        return self._plans["segments", start, stop]

    def varlen(self, device, start: int = 0, stop: int | None = None):
        """(cu_seqlens_q, cu_seqlens_k, max_q, max_k, key_index or None) for flash-attn's varlen kernel: the queries
        of tokens start..stop-1, the keys gathered from all tokens by key_index (None: the queries' own)."""
        if (device, start, stop) not in self._plans:
            segments = self.segments(start, stop)
            queries = [last - first for first, last, _ in segments]
            keys = [sum(end - begin for begin, end in spans) for _, _, spans in segments]
            index = torch.cat([torch.arange(begin, end) for _, _, spans in segments for begin, end in spans])
            own = index.numel() == self.rows * self.length and bool((index == torch.arange(index.numel())).all())
            self._plans[device, start, stop] = (_cumulative(queries, device), _cumulative(keys, device), max(queries),
                                                max(keys), None if own else index.to(device))
        return self._plans[device, start, stop]


def _cumulative(sizes, device):
    return torch.tensor([0] + sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)


class ContextShard:
    """One rank's share of a packed batch under context parallelism ("all-gather KV", as Llama 3 was trained on
    long contexts): the ranks of `group` hold consecutive spans of the layout's flat tokens, spans[r] on group rank
    r, cut anywhere (a sequence may straddle ranks). Each rank runs the model on its tokens only, input_ids [1, n]
    with position_ids of the whole sequences (for rotary embeddings), and passes this as prefops_layout. In every
    layer the ranks all-gather keys and values along the sequence (a reduce-scatter of their gradients in backward),
    and each query attends to its block's keys up to its own position, never through a T x T mask.
    """

    def __init__(self, layout: PackedLayout, group, spans):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("a context-parallel shard needs torch.distributed initialised (init_process_group)")
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed.ProcessGroup; got {type(group).__name__}")
        spans = tuple((int(start), int(stop)) for start, stop in spans)
        bounds = [0] + [stop for _, stop in spans]
        if (len(spans) != dist.get_world_size(group) or [start for start, _ in spans] != bounds[:-1]
                or bounds[-1] != layout.rows * layout.length or any(stop <= start for start, stop in spans)):
            raise ValueError(f"spans must be {dist.get_world_size(group)} consecutive non-empty spans, one per rank of "
                             f"the group, covering the layout's {layout.rows * layout.length} tokens; got {spans}")
        self.layout, self.group, self.spans = layout, group, spans
        self.span = spans[dist.get_rank(group)]

    @classmethod
    def even(cls, layout: PackedLayout, group) -> "ContextShard":
        """The layout cut into the group's size of near-equal spans."""
        total, ranks = layout.rows * layout.length, dist.get_world_size(group)
        if total < ranks:
            raise ValueError(f"{total} tokens cannot be shared by {ranks} context-parallel ranks")
        return cls(layout, group, [(total * r // ranks, total * (r + 1) // ranks) for r in range(ranks)])

    def gather(self, key: torch.Tensor, value: torch.Tensor):
        """This rank's keys and values [n, kv_heads, d] -> every rank's [N, kv_heads, d], in one collective."""
        both = _GatherSequence.apply(torch.cat([key, value], -1), self.group,
                                     tuple(stop - start for start, stop in self.spans))
        return both.split([key.shape[-1], value.shape[-1]], -1)


def _sequence_collectives():
    """(all-gather, reduce-scatter) of flat tensors; torch 2.13 renamed them."""
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor,
            getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)


class _GatherSequence(torch.autograd.Function):
    """The ranks' consecutive shares [n_r, ...] concatenated along dim 0. Every rank's queries read every share, so
    a share's gradient is the sum over the ranks of their gradients of it: a reduce-scatter. The shares travel
    padded to the longest (the collectives take equal sizes)."""

    @staticmethod
    def forward(ctx, local, group, sizes):
        ctx.group, ctx.sizes, ctx.rank = group, sizes, dist.get_rank(group)
        longest, rest = max(sizes), local.shape[1:]
        gathered = local.new_empty(len(sizes) * longest, *rest)
        _sequence_collectives()[0](gathered, torch.cat([local, local.new_zeros(longest - local.shape[0], *rest)]),
                                   group=group)
        return torch.cat([gathered[r * longest:r * longest + size] for r, size in enumerate(ctx.sizes)])

    @staticmethod
    def backward(ctx, grad):
        longest, rest = max(ctx.sizes), grad.shape[1:]
        padded = torch.cat([piece for share, size in zip(grad.split(ctx.sizes), ctx.sizes)
                            for piece in (share, grad.new_zeros(longest - size, *rest))])
        mine = grad.new_empty(longest, *rest)
        _sequence_collectives()[1](mine, padded, group=ctx.group)
        return mine[:ctx.sizes[ctx.rank]], None, None


class _LastDerived(threading.local):
    """The layout derived from the last source object (a tensor or a layout), so the layers of one forward
    derive it once. Tensors are matched by identity and in-place version; one per thread (DataParallel
    runs its replicas in threads)."""

    def __init__(self):
        self._source, self._version, self._layout = None, None, None

    def get(self, source, derive):
        version = getattr(source, "_version", None)
        if self._source is None or self._source() is not source or self._version != version:
            self._layout = derive(source)
            self._source, self._version = weakref.ref(source), version
        return self._layout


_DERIVED = {"layout": _LastDerived(), "cu_seqlens": _LastDerived(), "position_ids": _LastDerived()}


def _layout_of(batch, length, kwargs):
    """The PackedLayout of this forward (one causal block per row when nothing describes a packing)."""
    given = kwargs.get(LAYOUT_KWARG)
    if given is not None:
        if isinstance(given, PackedLayout):
            layout = given
        elif hasattr(given, "document_ids") and hasattr(given, "branch_ids"):
            layout = _DERIVED["layout"].get(given, PackedLayout.from_shared_prompt)
        else:
            raise TypeError(f"{LAYOUT_KWARG} must be a prefops.attention.PackedLayout or a "
                            f"prefops.shared_prompt.SharedPromptLayout; got {type(given).__name__}")
    elif kwargs.get("cu_seq_lens_q") is not None:
        cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k")
        if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k, cu_q):
            raise ValueError("cu_seq_lens_k differs from cu_seq_lens_q: prefops attention packs self-attention "
                             "only (queries and keys of the same sequences)")
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q describes one packed row; the batch has {batch} rows")
        layout = _DERIVED["cu_seqlens"].get(cu_q, lambda cu: PackedLayout.from_cu_seqlens(cu, length))
    elif kwargs.get("position_ids") is not None:
        position_ids = kwargs["position_ids"]
        if position_ids.dim() != 2 or position_ids.shape[-1] != length or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must be [B, T] or [1, T] with T = {length}; got "
                             f"{tuple(position_ids.shape)}")
        layout = _DERIVED["position_ids"].get(position_ids, lambda p: PackedLayout.from_position_ids(
            p.expand(batch, length)))
    else:
        return PackedLayout._sequences(batch, length, [])
    if (layout.rows, layout.length) != (batch, length):
        raise ValueError(f"{LAYOUT_KWARG} describes a {layout.rows} x {layout.length} batch; the model runs "
                         f"{batch} x {length} tokens (pass its input_ids and position_ids)")
    return layout


# ----------------------------------------------------------------------------- backends

def _flash_varlen():
    from flash_attn import flash_attn_varlen_func
    return flash_attn_varlen_func


def _use_flash(query, value) -> bool:
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] == value.shape[-1]
            and importlib.util.find_spec("flash_attn") is not None)


def _flash_blocks(query, key, value, layout, scaling, dropout, sliding_window, softcap, span=(0, None)):
    """Flat query [n, heads, d] of the tokens span (default all), key and value [N, kv_heads, d] of every token."""
    cu_q, cu_k, max_q, max_k, key_index = layout.varlen(query.device, *span)
    if key_index is not None:  # each piece's keys are [parent; own]: the backward of the gather sums the parents'
        key, value = key.index_select(0, key_index), value.index_select(0, key_index)
    options = {} if softcap is None else {"softcap": softcap}  # flash-attn < 2.6 has no softcap argument
    if sliding_window is not None:
        options["window_size"] = (sliding_window - 1, 0)
    return _flash_varlen()(query, key, value, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scaling,
                           causal=True, **options)


def _lower_right(queries, keys, device):
    # On CUDA torch's CausalBias runs the flash or memory-efficient kernel without a mask. Elsewhere it
    # materialises this [queries, keys] mask, built here directly: CausalBias, a tensor subclass, cannot
    # be created under a TorchDispatchMode (prefops.memory.AllocationRecorder).
    if device.type == "cuda":
        return causal_lower_right(queries, keys)
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)


def _pieces(queries, keys, sliding_window, device):
    """(query slice, key slice, attn_mask, is_causal) covering a block whose queries are its last `queries` of
    `keys` tokens. Under a sliding window longer blocks go in chunks of `sliding_window` queries, each against
    the keys it can see, so a mask is at most window x 2 window."""
    if sliding_window is None or keys <= sliding_window:
        mask = None if queries == keys else _lower_right(queries, keys, device)
        yield slice(0, queries), slice(0, keys), mask, mask is None
        return
    offset = keys - queries
    for first in range(0, queries, sliding_window):
        last = min(first + sliding_window, queries)
        low = max(0, offset + first - sliding_window + 1)
        at = torch.arange(offset + first, offset + last, device=device)[:, None]
        key = torch.arange(low, offset + last, device=device)[None, :]
        yield slice(first, last), slice(low, offset + last), (key <= at) & (key > at - sliding_window), False


def _sdpa_blocks(query, key, value, layout, scaling, dropout, sliding_window, span=(0, None)):
    """Flat query [n, heads, d] of the tokens span (default all), key and value [N, kv_heads, d] of every token."""
    segments = layout.segments(*span)
    bounds = sorted({0, key.shape[0]} | {end for _, _, spans in segments for keys in spans for end in keys})
    piece = {bound: i for i, bound in enumerate(bounds)}
    # One split per tensor: its backward writes every piece's gradient in one pass.
    q = query.split([last - first for first, last, _ in segments])
    k, v = (x.split([end - begin for begin, end in zip(bounds, bounds[1:])]) for x in (key, value))
    gqa = key.shape[1] != query.shape[1]
    outputs = []
    for queries, (_, _, spans) in zip(q, segments):
        pieces = [i for begin, end in spans for i in range(piece[begin], piece[end])]
        keys, values = (x[pieces[0]] if len(pieces) == 1 else torch.cat([x[i] for i in pieces]) for x in (k, v))
        for rows, columns, mask, causal in _pieces(queries.shape[0], keys.shape[0], sliding_window, query.device):
            out = F.scaled_dot_product_attention(
                queries[rows].transpose(0, 1)[None], keys[columns].transpose(0, 1)[None],
                values[columns].transpose(0, 1)[None], attn_mask=mask, dropout_p=dropout, is_causal=causal,
                scale=scaling, enable_gqa=gqa)
            outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs)


def _flat(x):
    """[B, heads, T, d] -> [B * T, heads, d]."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[-1])


# ----------------------------------------------------------------------------- transformers entry points

def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: query [B, heads, T, d], key/value [B, kv_heads, T, d]
    -> (output [B, T, heads, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    packed = attention_mask is None and key.shape[2] == query.shape[2] and is_causal
    if not packed:
        if kwargs.get(LAYOUT_KWARG) is not None:
            raise ValueError(f"{LAYOUT_KWARG} describes the whole packed batch: pass it without an attention_mask "
                             "and without a cache, to a causal model")
        kwargs.pop(LAYOUT_KWARG, None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("s_aux") is not None:
        raise ValueError("prefops attention has no attention sinks (s_aux); use attn_implementation='eager' or a "
                         "flash kernel that takes them")
    batch, heads, length, _ = query.shape
    given = kwargs.get(LAYOUT_KWARG)
    if isinstance(given, ContextShard):
        layout, span = given.layout, given.span
        if (batch, length) != (1, span[1] - span[0]):
            raise ValueError(f"{LAYOUT_KWARG}: this rank holds tokens {span[0]}..{span[1] - 1} of the context-parallel "
                             f"pack, so the model runs input_ids [1, {span[1] - span[0]}]; got {batch} x {length}")
        key, value = given.gather(_flat(key), _flat(value))
    else:
        layout, span = _layout_of(batch, length, kwargs), (0, None)
        key, value = _flat(key), _flat(value)
    query = _flat(query)
    sliding_window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if _use_flash(query, value):
        out = _flash_blocks(query, key, value, layout, scaling, dropout, sliding_window, softcap, span)
    elif softcap is not None:
        raise ValueError("prefops attention without flash-attn (torch SDPA) has no logit softcap; install "
                         "flash-attn on a GPU or use attn_implementation='eager'")
    else:
        out = _sdpa_blocks(query, key, value, layout, scaling, dropout, sliding_window, span)
    return out.view(batch, length, heads, -1), None


# The mask-function pieces transformers composes for a causal mask over packed rows, with or without a
# sliding window: what the blocks (and the sliding_window argument) express. Anything else (image
# blocks, chunked attention, bidirectional layers) gets the dense mask.
_PLAIN = {"causal_mask_function", "and_masks.<locals>.and_mask", "sliding_window_overlay.<locals>.inner_mask",
          "packed_sequence_mask_function.<locals>.inner_mask",
          "remap_positions_for_packed_sequence.<locals>.inner_mask"}


def _mask_pieces(function):
    """The qualified names of the functions a mask function is composed of, through their closures."""
    found, seen, stack = set(), set(), [function]
    while stack:
        function = stack.pop()
        if id(function) in seen:
            continue
        seen.add(id(function))
        found.add(getattr(function, "__qualname__", type(function).__qualname__))
        for cell in getattr(function, "__closure__", None) or ():
            contents = cell.cell_contents
            stack += [inner for inner in (contents if isinstance(contents, tuple) else (contents,)) if callable(inner)]
    return found


def mask_forward(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                 use_vmap=False, **kwargs):
    """transformers' mask-interface signature. None where attention_forward runs the layout from position_ids
    or prefops_layout (no padding, no cache, a causal mask); else the mask transformers builds for SDPA."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    if (q_length == kv_length and isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0 and not use_vmap
            and "causal_mask_function" in (pieces := _mask_pieces(mask_function)) and pieces <= _PLAIN
            and (attention_mask is None or bool(attention_mask.all()))):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     use_vmap=use_vmap, **kwargs)


def register(name: str = NAME) -> str:
    """Register attention_forward and mask_forward with transformers under `name` (idempotent); returns it."""
    require("transformers", TRANSFORMERS_ATTENTION, f"attn_implementation={name!r} (prefops.attention)")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_forward)
    return name
