"""Vocabulary parallelism: the lm_head weight (and bias) sharded along the vocabulary over a process group.

Rank r holds rows [v_r, v_r + V_r) of W (odd splits allowed) and the same hidden states and targets
as every other rank (targets are global vocabulary ids). A call runs the fused pass over its own rows
only and merges per-token statistics with O(N) collectives, never N x V (prefops.tiles' notation):
  forward   all-reduce MAX of m_r, then one all-reduce SUM of the rescaled
            s_r e^{m_r - m}, a_r, q_r e^{2(m_r - m)}, t_r (nonzero on the target's owner only), u_r,
            so every rank holds the global lse = m + log s, entropy = log s - a / s, sum p^2 = q / s^2
            and log p(target) = t - lse;
  backward  each rank forms the logit gradient of its own rows from the GLOBAL lse and entropy
            (tiles.tile_grad), so dW and db stay local and exact for its rows; dh = sum_r G_r W_r
            is all-reduced. Every rank computes the same loss from the same global outputs, so the
            upstream gradients agree and the all-reduced dh is exact on every rank.
The sharded weight comes either as a torch DTensor with one Shard(0) placement (its mesh dimension's
process group is the vocabulary group; to_local() carries the gradient back to the DTensor) or as a
local shard with vocab_group=. Sharded calls run the per-token paths (sliced or lean, per shard,
within the workspace of each rank): the 3-GEMM chunk loop would need every chunk's statistics
all-reduced before its head, a collective per chunk; see prefops.objective.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import fused, tiles
from .checks import check_targets_in_range


class VocabShard(NamedTuple):
    weight: torch.Tensor
    """This rank's rows [V_r, H] (a plain tensor)."""
    bias: Optional[torch.Tensor]
    group: object
    """The torch.distributed ProcessGroup over which the vocabulary is sharded."""
    start: int
    """Global id of this rank's first row."""
    vocab: int
    """Global vocabulary size V = sum_r V_r."""


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without the distributed package
        return None
    return DTensor


def is_dtensor(value) -> bool:
    kind = _dtensor_type()
    return kind is not None and isinstance(value, kind)


def _dtensor_group(weight, name):
    """The process group of the mesh dimension along which a DTensor is Shard(0); every other dimension
    must be Replicate."""
    from torch.distributed.tensor import Replicate, Shard

    sharded = [dim for dim, placement in enumerate(weight.placements) if placement == Shard(0)]
    others = [p for dim, p in enumerate(weight.placements) if dim not in sharded and not isinstance(p, Replicate)]
    if len(sharded) != 1 or others:
        raise ValueError(f"{name} as a DTensor must be Shard(0) on one mesh dimension and Replicate on the others "
                         f"(a vocabulary-sharded lm_head); got placements {tuple(weight.placements)}")
    return weight.device_mesh.get_group(sharded[0])


def local_replicated(value, name):
    """A DTensor that every rank holds whole (all placements Replicate) as its local tensor; anything
    else as is. Hidden states and targets must be the same on every rank of the vocabulary group."""
    if not is_dtensor(value):
        return value
    from torch.distributed.tensor import Replicate

    if not all(isinstance(p, Replicate) for p in value.placements):
        raise ValueError(f"{name} as a DTensor must be replicated on every rank of the vocabulary group; "
                         f"got placements {tuple(value.placements)}")
    return value.to_local()


def check_vocab_group(vocab_group):
    """vocab_group: None or an initialised ProcessGroup."""
    if vocab_group is None:
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("vocab_group needs torch.distributed initialised (init_process_group)")
    if not isinstance(vocab_group, torch.distributed.ProcessGroup):
        raise TypeError(f"vocab_group must be a torch.distributed.ProcessGroup or None; "
                        f"got {type(vocab_group).__name__}")
    return vocab_group


def shard_of(weight, bias=None, vocab_group=None, *, name="weight") -> Optional[VocabShard]:
    """The vocabulary shard a call was given: a Shard(0) DTensor weight, or a local weight with
    vocab_group; None for a whole (unsharded) weight. The bias, when given, is sharded alike."""
    vocab_group = check_vocab_group(vocab_group)
    if is_dtensor(weight):
        group = _dtensor_group(weight, name)
        if vocab_group is not None and vocab_group is not group:
            raise ValueError(f"{name} is a DTensor sharded over its own mesh group: pass vocab_group=None")
        if bias is not None and not is_dtensor(bias):
            raise TypeError(f"{name} is a DTensor: its bias must be a DTensor sharded alike (Shard(0))")
        weight = weight.to_local()
        if bias is not None:
            _dtensor_group(bias, "bias")
            bias = bias.to_local()
    elif vocab_group is None:
        if is_dtensor(bias):
            raise TypeError("bias is a DTensor but weight is not: shard both alike or neither")
        return None
    else:
        group = vocab_group
        if is_dtensor(bias):
            raise TypeError("with vocab_group, bias must be this rank's shard as a plain tensor, like weight")
    sizes = _gather_sizes(weight.shape[0], group, weight.device)
    rank = torch.distributed.get_rank(group)
    return VocabShard(weight, bias, group, sum(sizes[:rank]), sum(sizes))


def vocab_size(weight, vocab_group=None) -> int:
    """The whole vocabulary's size V of a weight that may be sharded (a collective with vocab_group)."""
    if is_dtensor(weight):
        return weight.shape[0]
    shard = shard_of(weight, None, vocab_group)
    return weight.shape[0] if shard is None else shard.vocab


def _gather_sizes(size: int, group, device) -> list[int]:
    """Every rank's number of rows (one collective of one integer per rank)."""
    local = torch.tensor([size], device=device, dtype=torch.int64)
    sizes = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(sizes, local, group=group)
    return [int(value) for value in sizes]


def all_reduce_stats(stats: tiles.Stats, group) -> tiles.Stats:
    """Merge the statistics of the ranks' vocabulary ranges (tiles.combine over the group): a MAX of the
    N row maxima, then one SUM of the five rescaled N-vectors."""
    m = stats.max.clone()
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    delta = stats.max - m
    c = delta.exp()
    parts = torch.stack([stats.sumexp * c, c * (stats.shifted + delta * stats.sumexp), stats.sumexp2 * c * c,
                         stats.target, stats.logit_sum])
    torch.distributed.all_reduce(parts, group=group)
    return tiles.Stats(m, *parts.unbind(0))


def all_reduce_kl_stats(stats, group):
    """prefops.token_kl.combine_kl_splits over the group: one MAX of both sides' row maxima, one SUM."""
    maxima = torch.stack([stats.a_max, stats.b_max])
    torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX, group=group)
    a_delta, b_delta = stats.a_max - maxima[0], stats.b_max - maxima[1]
    a_scale = a_delta.exp()
    parts = torch.stack([stats.a_sumexp * a_scale, stats.b_sumexp * b_delta.exp(),
                         a_scale * (stats.cross + (a_delta - b_delta) * stats.a_sumexp), stats.a_target,
                         stats.b_target])
    torch.distributed.all_reduce(parts, group=group)
    a_sumexp, b_sumexp, cross, a_target, b_target = parts.unbind(0)
    return type(stats)(maxima[0], a_sumexp, maxima[1], b_sumexp, cross, a_target, b_target)


def merge_top_k(values: torch.Tensor, ids: torch.Tensor, shard: VocabShard, k: int):
    """Each rank's top-k logits [n, k_r] (k_r = min(k, V_r)) and their local ids -> the group's top-k
    [n, k] with global ids: an all-gather of k values and ids per token, then a top-k of the R k."""
    short = k - values.shape[1]  # a shard of fewer than k rows: padded with entries that never win
    values = torch.nn.functional.pad(values, (0, short), value=tiles.EMPTY)
    ids = torch.nn.functional.pad(ids + shard.start, (0, short), value=-1)
    size = torch.distributed.get_world_size(shard.group)
    all_values = [torch.empty_like(values) for _ in range(size)]
    all_ids = [torch.empty_like(ids) for _ in range(size)]
    torch.distributed.all_gather(all_values, values.contiguous(), group=shard.group)
    torch.distributed.all_gather(all_ids, ids.contiguous(), group=shard.group)
    merged, pick = torch.cat(all_values, 1).topk(k, dim=1)
    return merged, torch.cat(all_ids, 1).gather(1, pick)


def gather_vocab(local: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Each rank's [..., V_r] -> the whole [..., V] on every rank (for checks on a few tokens only)."""
    sizes = _gather_sizes(local.shape[-1], shard.group, local.device)
    padded = torch.nn.functional.pad(local, (0, max(sizes) - local.shape[-1])).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded, group=shard.group)
    return torch.cat([part[..., :size] for part, size in zip(parts, sizes)], -1)


def all_reduce_grad(grad: Optional[torch.Tensor], group) -> Optional[torch.Tensor]:
    """dh = sum_r G_r W_r: each rank's rows contribute their share of the gradient of the hidden states."""
    if grad is not None:
        torch.distributed.all_reduce(grad, group=group)
    return grad


class _ShardedTokens(torch.autograd.Function):
    """ops.linear_logprobs_forward with the weight's rows sharded: the same outputs, the same backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, shard, options):
        ignore_index, temperature, softcap, backend, workspace, sliced, extras, fp32_weight_grad = options
        check_targets_in_range(targets, shard.vocab, ignore_index)
        rows, counted = fused.counted_rows(targets, ignore_index)
        stats = fused.token_stats(hidden, weight, bias, rows, counted - shard.start, temperature, softcap, backend,
                                  workspace, extras=tuple(extras), sliced=sliced, finalize=False)
        token = tiles.finalize(all_reduce_stats(stats, shard.group))
        token = token._replace(logit_sum=token.logit_sum / shard.vocab)
        n = targets.numel()
        wanted = (True, True, *extras, True)
        outputs = tuple(value.new_zeros(n).index_copy_(0, rows, value) if keep else value.new_zeros(n)
                        for value, keep in zip(token, wanted))
        ctx.save_for_backward(hidden, weight, bias, targets, outputs[1], outputs[2])
        ctx.shard, ctx.options, ctx.entropy = shard, options, extras[0]
        ctx.mark_non_differentiable(*outputs[3:], *([] if extras[0] else [outputs[2]]))
        return outputs

    @staticmethod
    def backward(ctx, grad_logp, grad_lse, grad_entropy, *_not_differentiable):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        ignore_index, temperature, softcap, backend, workspace, sliced, _, fp32_weight_grad = ctx.options
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        rows, counted = fused.counted_rows(targets, ignore_index)
        pick = lambda value: None if value is None else value.index_select(0, rows).float()  # noqa: E731
        zeros = torch.zeros_like(lse)
        grad_h, grad_w, grad_b = fused.token_grads(
            hidden, weight, bias, rows, counted - ctx.shard.start, pick(lse), pick(entropy),
            pick(zeros if grad_logp is None else grad_logp), pick(zeros if grad_lse is None else grad_lse),
            pick(grad_entropy) if ctx.entropy and grad_entropy is not None else None, temperature, softcap, backend,
            workspace, fp32_weight_grad, needs, sliced=sliced)
        return all_reduce_grad(grad_h, ctx.shard.group), grad_w, grad_b, None, None, None


def token_outputs(hidden, shard: VocabShard, targets, *, ignore_index, temperature, softcap, backend, workspace,
                  sliced, extras, fp32_weight_grad):
    """(logp, lse, entropy, sum_p2, mean_logit, top1) [N] of the whole vocabulary from this rank's shard;
    hidden [N, H] and targets [N] as in ops.linear_logprobs_forward, backend resolved."""
    options = (ignore_index, temperature, softcap, backend, workspace, sliced, list(extras), fp32_weight_grad)
    return _ShardedTokens.apply(hidden, shard.weight.contiguous(), shard.bias, targets, shard, options)
