"""Per-token KL between the policy and the reference next-token distributions, fused.

linear_token_kl streams the policy logits z = f(h W^T + b) and the reference logits
y = f(h_ref W_ref^T + b_ref) through the same vocabulary blocks and never builds
either N x V tensor. With a = softmax of the weighting side and b = softmax of the
other side (a = p_ref, b = p_θ for direction 'ref_policy'; swapped for 'policy_ref'),
per row it keeps the online statistics

    m_a = max z_a,  s_a = Σ exp(z_a - m_a),  m_b = max z_b,  s_b = Σ exp(z_b - m_b),
    c   = Σ exp(z_a - m_a) ((z_a - m_a) - (z_b - m_b)),

rescaled like the log-sum-exp when a block raises m_a or m_b, and finishes with

    KL(a || b) = Σ_v a_v (log a_v - log b_v) = c / s_a + log s_b - log s_a.

Both shifts keep every term O(spread of the logits), so logits of size 1e3 do not
cancel. The same pass gives log p_θ(target) and log p_ref(target) when targets are
given (TDPO needs all three), so a TDPO step runs two GEMMs forward (policy and
reference logits) and, in backward, recomputes both tiles and forms

    d loss / dz_v = g_kl (p_v - r_v)                            (ref_policy: KL(p_ref || p_θ))
                  = g_kl p_v (log p_v - log r_v - KL)           (policy_ref: KL(p_θ || p_ref))
                    + g_logp ([v = target] - p_v)

then dh and dW with the core op's chunk scheduling (prefops.fused.linear_grads).
Forward stores lse_θ, lse_ref and KL per counted token (12 bytes). Differentiable in
the policy hidden states, weight and bias only: the reference is frozen.

sequence_kl_objective puts a sequence-level head (TDPO) on top, with the two strategies
of prefops.sequence_objective. Lean is the op above. Budget packs whole loss groups into
chunks whose policy AND reference logits (fp32) and one gradient tile fit the budget; per
chunk two GEMMs materialise them, kernels/rows_kl.py gives KL, both lse and both target
log-probs, the head runs on the chunk, the gradient formed above goes to a tile in the
input dtype, and two GEMMs
give dh and dW: four GEMMs instead of six, backward only scales. The op alone has no
budget strategy: it returns per-token values whose upstream gradient is known only in
backward, so it would have to keep the N x V logits (not a bounded budget) or recompute
them, which is what lean does.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import fused, tiles, vocab_parallel
from . import strategy as strategy_module
from .checks import check_float, check_linear_inputs, check_targets_in_range, check_tensor
from .config import BACKENDS, check_choice, get_settings
from .chunks import ChunkRows, budget_objective, materialise
from .objective import _BLOCK_ROWS, Objective, plan_groups
from .per_sequence import _check_layout, _gather, _per_sequence
from .sequence_group import _sum_over, check_sequence_group, sequence_all_reduce
from .ops import IMPLEMENTATIONS

DIRECTIONS = ("ref_policy", "policy_ref")


class TokenKL(NamedTuple):
    """Per-token outputs (fp32, 0 at tokens that are not counted)."""

    kl: torch.Tensor
    """KL between the next-token distributions (differentiable in the policy)."""
    logp: torch.Tensor
    """log p_θ(target) (differentiable)."""
    ref_logp: torch.Tensor
    """log p_ref(target) (no gradient)."""


class KLStats(NamedTuple):
    """Online statistics of one row over a vocabulary range; side a weights the KL."""

    a_max: torch.Tensor
    a_sumexp: torch.Tensor
    b_max: torch.Tensor
    b_sumexp: torch.Tensor
    cross: torch.Tensor
    a_target: torch.Tensor
    b_target: torch.Tensor


def tile_kl_stats(za: torch.Tensor, zb: torch.Tensor, local_targets: torch.Tensor) -> KLStats:
    """Statistics of fp32 logit tiles za, zb [n, v]; local_targets = target - first column (-1: none)."""
    a_max, b_max = za.max(1).values, zb.max(1).values
    a_shift, b_shift = za - a_max[:, None], zb - b_max[:, None]
    ea = a_shift.exp()
    inside = (local_targets >= 0) & (local_targets < za.shape[1])
    index = local_targets.clamp(0, za.shape[1] - 1).long()[:, None]
    pick = lambda z: torch.where(inside, z.gather(1, index).squeeze(1), 0.0)  # noqa: E731
    return KLStats(a_max, ea.sum(1), b_max, b_shift.exp().sum(1), (ea * (a_shift - b_shift)).sum(1), pick(za), pick(zb))


def combine_kl_splits(partial: KLStats) -> KLStats:
    """Merge statistics of disjoint vocabulary ranges stored along a last dimension [n, splits]."""
    a_max, b_max = partial.a_max.max(1).values, partial.b_max.max(1).values
    a_delta, b_delta = partial.a_max - a_max[:, None], partial.b_max - b_max[:, None]
    a_scale = a_delta.exp()
    cross = a_scale * (partial.cross + (a_delta - b_delta) * partial.a_sumexp)
    return KLStats(a_max, (partial.a_sumexp * a_scale).sum(1), b_max, (partial.b_sumexp * b_delta.exp()).sum(1),
                   cross.sum(1), partial.a_target.sum(1), partial.b_target.sum(1))


def finalize_kl(stats: KLStats):
    """-> (KL(a || b), lse_a, lse_b, log a(target), log b(target))."""
    log_sa, log_sb = stats.a_sumexp.log(), stats.b_sumexp.log()
    lse_a, lse_b = stats.a_max + log_sa, stats.b_max + log_sb
    kl = stats.cross / stats.a_sumexp + log_sb - log_sa
    return kl, lse_a, lse_b, stats.a_target - lse_a, stats.b_target - lse_b


def tile_kl_grad(z, y, local_targets, lse, ref_lse, kl, grad_kl, grad_logp, policy_first, slope):
    """d loss / d(h W^T + b) of the policy for a tile, loss = Σ_r g_kl KL_r + g_logp log p_θ(target_r).

    z, y: fp32 policy and reference logits [n, v] (after temperature and softcap); slope: dz / d(h W^T + b)
    of the policy (tiles.transform_with_slope)."""
    log_p = z - lse[:, None]
    p = log_p.exp()
    if policy_first:  # KL(p || r): p_v (log p_v - log r_v - KL)
        dkl = p * (log_p - (y - ref_lse[:, None]) - kl[:, None])
    else:  # KL(r || p): p_v - r_v
        dkl = p - (y - ref_lse[:, None]).exp()
    zeros = torch.zeros_like(lse)
    return (tiles.tile_grad(z, local_targets, lse, None, grad_logp, zeros, None, 1.0) + grad_kl[:, None] * dkl) * slope


def _sides(policy, reference, policy_first):
    return (policy, reference) if policy_first else (reference, policy)


def _torch_stats(policy, reference, rows, targets, policy_first, temperature, softcap, workspace):
    """KLStats of the counted rows on the chunked PyTorch backend, one bounded fp32 tile pair at a time."""
    n, vocab = rows.numel(), policy[1].shape[0]
    row_chunk = min(n, 1024)
    # Two sides, about four fp32 temporaries each.
    v_chunk = max(1, min(vocab, workspace // (32 * row_chunk)))
    return _materialised_stats(policy, reference, rows, targets, policy_first, temperature, softcap, False, row_chunk,
                               v_chunk)


def _sliced_stats(policy, reference, rows, targets, policy_first, temperature, softcap, backend, workspace):
    """KLStats of the counted rows from both sides' materialised fp32 slices (a GEMM each, cuBLAS on
    CUDA), folded by the row kernel on the Triton backend, by tile_kl_stats otherwise."""
    n, vocab = rows.numel(), policy[1].shape[0]
    rows_kernel = backend == "triton"
    # Both sides' fp32 slices, plus on the PyTorch path about three temporaries a side.
    per_element = 8 if rows_kernel else 32
    width = policy[0].shape[-1] + reference[0].shape[-1]
    row_chunk, v_chunk = fused.plan_slices(n, vocab, width, per_element, workspace, policy[0].element_size())
    return _materialised_stats(policy, reference, rows, targets, policy_first, temperature, softcap, rows_kernel,
                               row_chunk, v_chunk)


def _materialised_stats(policy, reference, rows, targets, policy_first, temperature, softcap, rows_kernel, row_chunk,
                        v_chunk):
    """KLStats from both sides' fp32 slices [row_chunk, v_chunk] materialised by a GEMM each, folded by the
    KL row kernel (rows_kernel) or by tile_kl_stats; merged slice by slice, so that the statistics of
    every slice side by side never grow with V / v_chunk."""
    n, vocab = rows.numel(), policy[1].shape[0]
    parts = []
    for r0 in range(0, n, row_chunk):
        chunk_rows = rows[r0:r0 + row_chunk]
        h_rows = [side[0].index_select(0, chunk_rows) for side in (policy, reference)]
        local = targets[r0:r0 + row_chunk]
        running = None
        for v0 in range(0, vocab, v_chunk):
            z, y = (fused._linear_fp32(h, side[1], side[2], v0, v0 + v_chunk)
                    for h, side in zip(h_rows, (policy, reference)))
            local_v = torch.where(local >= 0, local - v0, -1)
            if rows_kernel:
                from .kernels.rows_kl import launch_rows_kl_stats

                block = launch_rows_kl_stats(z, y, local_v, policy_first, temperature, softcap)
            else:
                za, zb = _sides(tiles.transform(z, temperature, softcap), tiles.transform(y, temperature, softcap),
                                policy_first)
                block = tile_kl_stats(za, zb, local_v)
                del za, zb
            del z, y
            running = block if running is None else combine_kl_splits(
                KLStats(*(torch.stack(pair, 1) for pair in zip(running, block))))
        parts.append(running)
    return KLStats(*(torch.cat(column) for column in zip(*parts)))


def _scatter(rows, values, n):
    return values.new_zeros(n).index_copy_(0, rows, values)


def _counted(targets, counted):
    rows = counted.nonzero().squeeze(1)
    return rows, targets.index_select(0, rows).to(torch.int32)


def _forward_impl(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  ref_hidden: torch.Tensor, ref_weight: torch.Tensor, ref_bias: Optional[torch.Tensor],
                  targets: torch.Tensor, counted: torch.Tensor, policy_first: bool, temperature: float,
                  softcap: Optional[float], backend: str, workspace: int, sliced: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H], ref_hidden [N, H_ref], targets [N] (-1: none), counted [N] bool
    -> (kl, logp, ref_logp, lse, ref_lse), each [N] fp32, 0 where not counted."""
    rows, row_targets = _counted(targets, counted)
    n = targets.numel()
    if rows.numel() == 0:
        return tuple(hidden.new_zeros(n, dtype=torch.float32) for _ in range(5))
    stats = _kl_stats((hidden, weight, bias), (ref_hidden, ref_weight, ref_bias), rows, row_targets, policy_first,
                      temperature, softcap, fused.resolve_backend(backend, hidden.device), workspace, sliced)
    return _kl_outputs(stats, rows, row_targets, policy_first, n)


def _kl_stats(policy, reference, rows, row_targets, policy_first, temperature, softcap, backend, workspace, sliced):
    """KLStats of the counted rows over the vocabulary of weight and ref_weight, backend resolved."""
    if sliced:
        return _sliced_stats(policy, reference, rows, row_targets, policy_first, temperature, softcap, backend,
                             workspace)
    if backend == "triton":
        from .kernels.token_kl_stats import launch_token_kl_stats

        first, second = _sides(policy, reference, policy_first)
        return combine_kl_splits(launch_token_kl_stats(*first, *second, rows, row_targets, temperature, softcap))
    return _torch_stats(policy, reference, rows, row_targets, policy_first, temperature, softcap, workspace)


def _kl_outputs(stats, rows, row_targets, policy_first, n):
    """(kl, logp, ref_logp, lse, ref_lse) [n] from the counted rows' whole-vocabulary statistics."""
    kl, lse_a, lse_b, logp_a, logp_b = finalize_kl(stats)
    lse, ref_lse = _sides(lse_a, lse_b, policy_first)
    logp, ref_logp = _sides(logp_a, logp_b, policy_first)
    has_target = row_targets >= 0
    logp, ref_logp = (torch.where(has_target, value, 0.0) for value in (logp, ref_logp))
    return tuple(_scatter(rows, value, n) for value in (kl, logp, ref_logp, lse, ref_lse))


linear_token_kl_forward = torch.library.custom_op("prefops::linear_token_kl", mutates_args=())(_forward_impl)


@linear_token_kl_forward.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, counted, policy_first, temperature, softcap,
      backend, workspace, sliced):
    return tuple(hidden.new_empty(targets.numel(), dtype=torch.float32) for _ in range(5))


def _backward_impl(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   ref_hidden: torch.Tensor, ref_weight: torch.Tensor, ref_bias: Optional[torch.Tensor],
                   targets: torch.Tensor, counted: torch.Tensor, lse: torch.Tensor, ref_lse: torch.Tensor,
                   kl: torch.Tensor, grad_kl: torch.Tensor, grad_logp: torch.Tensor, policy_first: bool,
                   temperature: float, softcap: Optional[float], backend: str, workspace: int, sliced: bool,
                   fp32_weight_grad: bool, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dh [N, H], dW [V, H], db [V]) of the policy; an unneeded one comes back empty."""
    rows, row_targets = _counted(targets, counted)
    lse, ref_lse, kl, grad_kl, grad_logp = (value.index_select(0, rows).float()
                                            for value in (lse, ref_lse, kl, grad_kl, grad_logp))
    backend = fused.resolve_backend(backend, hidden.device)
    reference_rows = _ChunkRows(ref_hidden)

    rows_kernel = sliced and backend == "triton"

    def tile(chunk, chunk_rows, h_rows, v0, v1):
        per_row = (row_targets[chunk], lse[chunk], ref_lse[chunk], kl[chunk], grad_kl[chunk], grad_logp[chunk])
        if rows_kernel:
            from .kernels.rows_kl import launch_rows_kl_grad

            z = fused._linear_fp32(h_rows, weight, bias, v0, v1)
            y = fused._linear_fp32(reference_rows.get(chunk_rows), ref_weight, ref_bias, v0, v1)
            out = torch.empty(chunk_rows.numel(), v1 - v0, device=hidden.device, dtype=hidden.dtype)
            local = torch.where(per_row[0] >= 0, per_row[0] - v0, -1)
            return launch_rows_kl_grad(z, y, out, local, *per_row[1:], policy_first, temperature, softcap)
        if backend == "triton" and not sliced:
            from .kernels.token_kl_grad import launch_token_kl_grad

            out = torch.empty(chunk_rows.numel(), v1 - v0, device=hidden.device, dtype=hidden.dtype)
            return launch_token_kl_grad(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, chunk_rows, *per_row,
                                        policy_first, temperature, softcap, v0, out)
        z, slope = tiles.transform_with_slope(fused._linear_fp32(h_rows, weight, bias, v0, v1), temperature, softcap)
        y = tiles.transform(fused._linear_fp32(reference_rows.get(chunk_rows), ref_weight, ref_bias, v0, v1),
                            temperature, softcap)
        local = torch.where(per_row[0] >= 0, per_row[0] - v0, -1)
        return tile_kl_grad(z, y, local, *per_row[1:], policy_first, slope).to(hidden.dtype)

    # The PyTorch tile: both sides' logits and tile_kl_grad's temporaries, 9 fp32 values an element at
    # their peak (measured by tests/test_memory.py), then the tile rounded to the input dtype.
    if rows_kernel:
        tile_bytes = 2 * 4 + weight.element_size()  # both sides' fp32 slices and the gradient
    else:
        tile_bytes = weight.element_size() if backend == "triton" and not sliced else 9 * 4 + weight.element_size()
    plan = fused.sliced_backward_plan(hidden, hidden.shape[-1] + ref_hidden.shape[-1]) if sliced else None
    grads = fused.linear_grads(hidden, weight, bias, rows, tile, tile_bytes, workspace, fp32_weight_grad,
                               tuple(needs), plan=plan)
    return tuple(hidden.new_empty(0) if grad is None else grad for grad in grads)


class _ChunkRows:
    """The reference hidden rows of the current row chunk, gathered once per chunk, not per tile."""

    def __init__(self, hidden):
        self.hidden, self.rows, self.value = hidden, None, None

    def get(self, rows):
        if self.rows is not rows:
            self.rows, self.value = rows, self.hidden.index_select(0, rows)
        return self.value


linear_token_kl_backward = torch.library.custom_op("prefops::linear_token_kl_backward",
                                                   mutates_args=())(_backward_impl)


@linear_token_kl_backward.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, counted, lse, ref_lse, kl, grad_kl,
      grad_logp, policy_first, temperature, softcap, backend, workspace, sliced, fp32_weight_grad, needs):
    return (torch.empty_like(hidden) if needs[0] else hidden.new_empty(0),
            torch.empty_like(weight) if needs[1] else hidden.new_empty(0),
            torch.empty_like(bias) if needs[2] else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, counted, policy_first, temperature, softcap,
     backend, workspace, sliced) = inputs
    kl, _, _, lse, ref_lse = output
    ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, counted, lse, ref_lse, kl)
    ctx.options = (policy_first, temperature, softcap, backend, workspace, get_settings().fp32_weight_grad)
    ctx.sliced = sliced  # an attribute: prefops.tools.compare reads the path that ran off the graph
    ctx.mark_non_differentiable(*output[2:])


def _backward(ctx, grad_kl, grad_logp, _grad_ref_logp, _grad_lse, _grad_ref_lse):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, counted, lse, ref_lse, kl = ctx.saved_tensors
    policy_first, temperature, softcap, backend, workspace, fp32_weight_grad = ctx.options
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    zeros = lambda grad: torch.zeros_like(lse) if grad is None else grad  # noqa: E731
    grad_h, grad_w, grad_b = linear_token_kl_backward(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, counted, lse, ref_lse, kl, zeros(grad_kl),
        zeros(grad_logp), policy_first, temperature, softcap, backend, workspace, ctx.sliced, fp32_weight_grad,
        needs)
    keep = lambda grad, needed: grad if needed else None  # noqa: E731
    return (keep(grad_h, needs[0]), keep(grad_w, needs[1]), keep(grad_b, needs[2])) + (None,) * 11


linear_token_kl_forward.register_autograd(_backward, setup_context=_setup_context)

IMPLEMENTATIONS.update({
    "prefops::linear_token_kl": _forward_impl,
    "prefops::linear_token_kl_backward": _backward_impl,
})


class _ShardedKL(torch.autograd.Function):
    """linear_token_kl_forward with both models' vocabulary rows sharded alike (prefops.vocab_parallel):
    each rank's statistics of its rows, merged over the group; in backward its rows' gradient from the
    global lse, ref_lse and KL (dW local), dh all-reduced."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, counted, shard, options):
        policy_first, temperature, softcap, backend, workspace, sliced, _ = options
        rows, row_targets = _counted(targets, counted)
        local = torch.where(targets >= 0, targets - shard.start, -1)  # other ranks' targets: outside these rows
        outputs = tuple(hidden.new_zeros(targets.numel(), dtype=torch.float32) for _ in range(5))
        if rows.numel():  # the same rows on every rank: all skip the collectives together
            stats = _kl_stats((hidden, weight, bias), (ref_hidden, ref_weight, ref_bias), rows,
                              local.index_select(0, rows).to(torch.int32), policy_first, temperature, softcap,
                              backend, workspace, sliced)
            outputs = _kl_outputs(vocab_parallel.all_reduce_kl_stats(stats, shard.group), rows, row_targets,
                                  policy_first, targets.numel())
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, local, counted, *outputs[3:],
                              outputs[0])
        ctx.shard, ctx.options = shard, options
        ctx.mark_non_differentiable(*outputs[2:])
        return outputs

    @staticmethod
    def backward(ctx, grad_kl, grad_logp, *_not_differentiable):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, local, counted, lse, ref_lse, kl = ctx.saved_tensors
        policy_first, temperature, softcap, backend, workspace, sliced, fp32_weight_grad = ctx.options
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        zeros = lambda grad: torch.zeros_like(lse) if grad is None else grad  # noqa: E731
        grads = _backward_impl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, local, counted, lse, ref_lse,
                               kl, zeros(grad_kl), zeros(grad_logp), policy_first, temperature, softcap, backend,
                               workspace, sliced, fp32_weight_grad, needs)
        grad_h, grad_w, grad_b = (grad if needed else None for grad, needed in zip(grads, needs))
        return (vocab_parallel.all_reduce_grad(grad_h, ctx.shard.group), grad_w, grad_b) + (None,) * 7


def _reference_shard(shard, ref_weight, ref_bias, vocab_group):
    """The reference's shard, which must hold the same vocabulary rows as the policy's."""
    ref_shard = vocab_parallel.shard_of(ref_weight, ref_bias, vocab_group, name="ref_weight")
    if ref_shard is None or (ref_shard.start, ref_shard.vocab, ref_shard.weight.shape[0]) != (
            shard.start, shard.vocab, shard.weight.shape[0]):
        raise ValueError("with a vocabulary-sharded weight, ref_weight must be sharded alike (the same rows of the "
                         "same vocabulary on every rank)")
    return ref_shard


def check_reference_inputs(hidden, weight, ref_hidden, ref_weight, ref_bias):
    """The reference side must cover the same tokens and the same vocabulary as the policy."""
    check_tensor(ref_hidden, "ref_hidden")
    check_tensor(ref_weight, "ref_weight")
    check_float(ref_hidden, "ref_hidden")
    check_float(ref_weight, "ref_weight")
    if ref_hidden.dim() < 1 or tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(f"ref_hidden must have shape [..., H_ref] with the leading shape of hidden "
                         f"{tuple(hidden.shape[:-1])}; got {tuple(ref_hidden.shape)}")
    if ref_weight.dim() != 2 or ref_weight.shape[1] != ref_hidden.shape[-1]:
        raise ValueError(f"ref_weight must have shape [V, H_ref] with H_ref = ref_hidden.shape[-1] = "
                         f"{ref_hidden.shape[-1]}; got {tuple(ref_weight.shape)}")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"policy and reference vocabularies differ: weight has V = {weight.shape[0]} rows, "
                         f"ref_weight has {ref_weight.shape[0]}; the per-token KL needs one shared vocabulary")
    for name, value in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight)):
        if value.dtype != hidden.dtype:
            raise TypeError(f"{name} dtype {value.dtype} must equal hidden dtype {hidden.dtype}")
    for name, value in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        if value is not None and value.device != hidden.device:
            raise ValueError(f"{name} is on {value.device} but hidden is on {hidden.device}; put both on one device")
    if ref_bias is not None:
        check_tensor(ref_bias, "ref_bias")
        if tuple(ref_bias.shape) != (ref_weight.shape[0],) or ref_bias.dtype != ref_weight.dtype:
            raise ValueError(f"ref_bias must have shape [V] = ({ref_weight.shape[0]},) and dtype {ref_weight.dtype}; "
                             f"got {tuple(ref_bias.shape)} {ref_bias.dtype}")


def linear_token_kl(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None, direction="ref_policy",
                    mask=None, targets=None, ignore_index=-100, temperature=1.0, softcap=None, backend=None,
                    strategy=None, vocab_group=None):
    """Per-token KL between the policy's and the reference's next-token distributions, without N x V logits.

    Args:
        hidden [..., H], weight [V, H], bias [V]: the policy's final hidden states and lm_head.
        ref_hidden [..., H_ref], ref_weight [V, H_ref], ref_bias [V]: the reference's, same tokens and
            vocabulary and dtype (H_ref may differ from H).
        direction: 'ref_policy' gives KL(p_ref || p_θ) = Σ_v p_ref (log p_ref - log p_θ) (TDPO's);
            'policy_ref' gives KL(p_θ || p_ref).
        mask: [...] bool, True where the KL counts; other tokens never reach the GEMMs and get 0.
        targets: [...] token ids (ignore_index where not counted). When given, the same pass also
            returns log p_θ(target) and log p_ref(target) and the result is a TokenKL tuple.
        temperature, softcap: the same logit transform on both sides, as in prefops.linear_logprobs.
        backend: 'auto', 'triton' or 'torch' (default from prefops.configure()).

    strategy: 'lean' runs the fused Triton kernels; any other the sliced path (both sides' logits
    in cuBLAS slices within the workspace, recomputed in backward; prefops.strategy). A 3-GEMM path
    needs the loss's gradient during forward (see sequence_kl_objective).
    vocab_group: weight and ref_weight (and biases) are this rank's rows of a vocabulary sharded over this
    process group, alike on both sides (Shard(0) DTensors need no vocab_group); see prefops.linear_logprobs.

    Returns fp32 [...] KL (or TokenKL(kl, logp, ref_logp)). Differentiable in hidden, weight and bias;
    the reference side gets no gradient. Nothing is saved when no input requires grad.
    """
    shard = vocab_parallel.shard_of(weight, bias, vocab_group)
    if shard is not None:
        ref_shard = _reference_shard(shard, ref_weight, ref_bias, vocab_group)
        hidden, ref_hidden = (vocab_parallel.local_replicated(x, name) for x, name in ((hidden, "hidden"),
                                                                                       (ref_hidden, "ref_hidden")))
        weight, bias, ref_weight, ref_bias = shard.weight, shard.bias, ref_shard.weight, ref_shard.bias
    dummy_targets = torch.zeros((), dtype=torch.long, device=getattr(hidden, "device", None))
    check_tensor(hidden, "hidden")
    check_linear_inputs(hidden, weight, dummy_targets.expand(hidden.shape[:-1]) if targets is None else targets,
                        bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap)
    check_reference_inputs(hidden, weight, ref_hidden, ref_weight, ref_bias)
    check_choice(direction, DIRECTIONS, "direction")
    shape = tuple(hidden.shape[:-1])
    counted = torch.ones(shape, dtype=torch.bool, device=hidden.device)
    if mask is not None:
        check_tensor(mask, "mask")
        if mask.dtype != torch.bool or tuple(mask.shape) != shape or mask.device != hidden.device:
            raise ValueError(f"mask must be a bool tensor of shape hidden.shape[:-1] = {shape} on {hidden.device}; "
                             f"got {mask.dtype} {tuple(mask.shape)} on {mask.device}")
        counted = mask
    if targets is not None:
        check_targets_in_range(targets, weight.shape[0] if shard is None else shard.vocab, ignore_index)
        counted = counted & (targets != ignore_index)
        flat_targets = torch.where(counted, targets, -1).reshape(-1)
    else:
        flat_targets = torch.full((counted.numel(),), -1, dtype=torch.int32, device=hidden.device)
    settings = get_settings()
    backend = check_choice(backend or settings.backend, BACKENDS, "backend")
    sliced, workspace = strategy_module.token_path(strategy)
    flatten = lambda x: x.reshape(-1, x.shape[-1]).contiguous()  # noqa: E731
    inputs = (flatten(hidden), weight.contiguous(), bias, flatten(ref_hidden).detach(),
              ref_weight.contiguous().detach(), None if ref_bias is None else ref_bias.detach(), flat_targets,
              counted.reshape(-1))
    softcap = None if softcap is None else float(softcap)
    if shard is None:
        kl, logp, ref_logp, _, _ = linear_token_kl_forward(*inputs, direction == "policy_ref", float(temperature),
                                                           softcap, backend, workspace, sliced)
    else:
        kl, logp, ref_logp, _, _ = _ShardedKL.apply(*inputs, shard, (
            direction == "policy_ref", float(temperature), softcap, fused.resolve_backend(backend, hidden.device),
            workspace, sliced, settings.fp32_weight_grad))
    strategy_module.record("sliced" if sliced else "lean")
    if targets is None:
        return kl.view(shape)
    return TokenKL(kl.view(shape), logp.view(shape), ref_logp.view(shape))


def sequence_kl(hidden, weight, ref_hidden, ref_weight, targets, *, seq_ids=None, num_sequences=None,
                ignore_index=-100, **options):
    """SeqKL = Σ_t KL_t over each sequence's counted tokens (targets != ignore_index), as TDPO uses it.

    Padded batches: hidden [B, T, H], targets [B, T] -> [B]. Packed tokens: hidden [N, H],
    targets [N] with seq_ids [N] (-1: no sequence) -> [num_sequences]. Other keyword options
    (bias, ref_bias, direction, temperature, softcap, backend) go to linear_token_kl; differentiable
    in the policy.
    """
    from .sequences import sequence_sum

    mask = targets != ignore_index
    if seq_ids is not None:
        mask = mask & (seq_ids >= 0)
    kl = linear_token_kl(hidden, weight, ref_hidden, ref_weight, mask=mask, **options)
    if seq_ids is None:
        return sequence_sum(kl, mask)
    return sequence_sum(kl.reshape(-1), seq_ids=seq_ids.reshape(-1), num_sequences=num_sequences)


def sequence_kl_objective(hidden, weight, ref_hidden, ref_weight, targets, *, head, groups, seq_ids=None,
                          token_weights=None, bias=None, ref_bias=None, direction="ref_policy", ignore_index=-100,
                          temperature=1.0, softcap=None, strategy=None, budget=None, backend=None,
                          sequence_group=None, vocab_group=None) -> Objective:
    """Sequence-level heads over the per-token KL and both models' target log-probs (the TDPO losses).

    Args as prefops.sequence_objective (layout: padded [B, T] or flat tokens with seq_ids) and
    prefops.linear_token_kl (the reference side, direction, transform), with
        head: head(logps [G', K], group_index [G'], stats {name: [G', K]}) -> scalar, additive over
            groups; logps = Σ_t w_t log p_θ(y_t), stats 'kl' = Σ_t KL_t (both differentiable),
            'ref_logp' = Σ_t w_t log p_ref(y_t) and 'count' (counted tokens).
        strategy, budget: 'lean' (prefops.linear_token_kl) or 'budget' (the policy and the reference
            logits of whole groups within `budget` bytes, both counted); default from
            prefops.configure(). Budget falls back to lean with a warning when a group does not fit.
        sequence_group: ranks that each hold a share of every sequence's tokens, as in
            prefops.sequence_objective: the head reads the group's sums of all four quantities.
        vocab_group: both models' vocabulary rows sharded alike, as in prefops.linear_token_kl; such a
            call runs the strategy's last per-token path (as prefops.sequence_objective does).

    Returns Objective(loss, logps [S], stats {'kl', 'ref_logp', 'count'} [S]), all but loss detached.
    """
    shard = vocab_parallel.shard_of(weight, bias, vocab_group)
    if shard is not None:
        ref_shard = _reference_shard(shard, ref_weight, ref_bias, vocab_group)
        hidden, ref_hidden = (vocab_parallel.local_replicated(x, name) for x, name in ((hidden, "hidden"),
                                                                                       (ref_hidden, "ref_hidden")))
        weight, bias, ref_weight, ref_bias = shard.weight, shard.bias, ref_shard.weight, ref_shard.bias
        vocab_group = shard.group
    check_linear_inputs(hidden, weight, targets, bias, ignore_index=ignore_index, temperature=temperature,
                        softcap=softcap)
    check_reference_inputs(hidden, weight, ref_hidden, ref_weight, ref_bias)
    check_choice(direction, DIRECTIONS, "direction")
    sequence_group = check_sequence_group(sequence_group)
    settings = get_settings()
    choice = strategy_module.resolve(strategy, budget)
    flat_seq, groups, num_sequences = _check_layout(targets, seq_ids, groups, token_weights, sequence_group)
    flat_targets = targets.reshape(-1)
    counted = (flat_targets != ignore_index) & (flat_seq >= 0)
    weights = counted.float() if token_weights is None else torch.where(counted, token_weights.reshape(-1).float(), 0.0)
    count = _per_sequence(counted.float(), flat_seq, num_sequences)
    flatten = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    if shard is None:
        plan = plan_groups(choice, flat_seq, counted, groups, num_sequences, weight, sequence_group, sides=2)
    else:
        plan = strategy_module.record(strategy_module.group_paths(choice)[-1])
    if not isinstance(plan, str):
        check_targets_in_range(flat_targets, weight.shape[0], ignore_index)
        row_backend = fused.resolve_backend(check_choice(backend or settings.backend, BACKENDS, "backend"),
                                            hidden.device)
        reference = (flatten(ref_hidden).detach(), ref_weight.detach(), None if ref_bias is None else ref_bias.detach())
        count = sequence_all_reduce(count, sequence_group)
        math = _KLRows(head, groups, weights, counted.float(), count, reference, direction == "policy_ref",
                       float(temperature), softcap, row_backend)
        loss, sums = budget_objective(flatten(hidden), weight, bias, flat_targets, math, plan, groups, flat_seq,
                                      num_sequences, sequence_group)
        return Objective(loss, sums["logps"], {"count": count, "kl": sums["kl"], "ref_logp": sums["ref_logps"]})
    token = linear_token_kl(hidden, weight, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias, direction=direction,
                            targets=torch.where(counted.view(targets.shape), targets, ignore_index),
                            ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                            strategy=plan, vocab_group=vocab_group)
    total = lambda values, w: _per_sequence(values.reshape(-1) * w, flat_seq, num_sequences)  # noqa: E731
    sums = _sum_over(sequence_group, {"logps": total(token.logp, weights), "kl": total(token.kl, counted.float()),
                                      "ref_logps": total(token.ref_logp, weights), "count": count})
    logps, kl, ref_logps, count = sums["logps"], sums["kl"], sums["ref_logps"].detach(), sums["count"].detach()
    stats = {"kl": _gather(kl, groups), "ref_logp": _gather(ref_logps, groups), "count": _gather(count, groups)}
    loss = head(_gather(logps, groups), torch.arange(groups.shape[0], device=groups.device), stats)
    return Objective(loss, logps.detach(), {"count": count, "kl": kl.detach(), "ref_logp": ref_logps})


class _KLRows(ChunkRows):
    """Budget strategy of the per-token KL: per chunk, the reference logits are materialised
    beside the policy's (forward only) and stay until the policy gradient is formed."""

    differentiable = ("logps", "kl")

    def __init__(self, head, groups, weights, counted, count, reference, policy_first, temperature, softcap,
                 backend):
        self.user_head, self.reference = head, reference
        self.group_count = _gather(count, groups)  # once: each chunk picks its groups' rows
        self.policy_first, self.temperature, self.softcap, self.backend = policy_first, temperature, softcap, backend
        self.weights = {"logps": weights, "kl": counted, "ref_logps": weights}

    def token_values(self, logits, rows, targets):
        ref_hidden, ref_weight, ref_bias = self.reference
        ref_logits = materialise(ref_hidden.index_select(0, rows), ref_weight, ref_bias)
        stats = rows_kl_stats(logits, ref_logits, targets, self.policy_first, self.temperature, self.softcap,
                              self.backend)
        kl, lse_a, lse_b, logp_a, logp_b = finalize_kl(stats)
        lse, ref_lse = _sides(lse_a, lse_b, self.policy_first)
        logp, ref_logp = _sides(logp_a, logp_b, self.policy_first)
        return {"logps": logp, "kl": kl, "ref_logps": ref_logp}, (ref_logits, lse, ref_lse, kl)

    def head(self, sums, group_index):
        stats = {"kl": sums["kl"], "ref_logp": sums["ref_logps"], "count": self.group_count[group_index]}
        return self.user_head(sums["logps"], group_index, stats)

    def logit_grads(self, logits, targets, saved, grads, out):
        rows_kl_grads(logits, saved[0], out, targets, *saved[1:], grads["kl"], grads["logps"], self.policy_first,
                      self.temperature, self.softcap, self.backend)


def rows_kl_stats(logits, ref_logits, targets, policy_first, temperature, softcap, backend) -> KLStats:
    """KLStats of materialised policy and reference logits [n, V] (side a = policy when policy_first)."""
    if backend == "triton":
        from .kernels.rows_kl import launch_rows_kl_stats

        return launch_rows_kl_stats(logits, ref_logits, targets, policy_first, temperature, softcap)
    parts = []
    for r0 in range(0, logits.shape[0], _BLOCK_ROWS):
        z, y = (tiles.transform(x[r0:r0 + _BLOCK_ROWS], temperature, softcap) for x in (logits, ref_logits))
        parts.append(tile_kl_stats(*_sides(z, y, policy_first), targets[r0:r0 + _BLOCK_ROWS]))
    return KLStats(*(torch.cat(column) for column in zip(*parts)))


def rows_kl_grads(logits, ref_logits, out, targets, lse, ref_lse, kl, grad_kl, grad_logp, policy_first,
                  temperature, softcap, backend):
    """Write d(Σ g_kl KL + g_logp log p_θ(target)) / d logits of the policy logits [n, V] into out
    [n, V] (may be logits)."""
    if backend == "triton":
        from .kernels.rows_kl import launch_rows_kl_grad

        launch_rows_kl_grad(logits, ref_logits, out, targets, lse, ref_lse, kl, grad_kl, grad_logp, policy_first,
                            temperature, softcap)
        return
    for r0 in range(0, logits.shape[0], _BLOCK_ROWS):
        block = slice(r0, r0 + _BLOCK_ROWS)
        z, slope = tiles.transform_with_slope(logits[block], temperature, softcap)
        y = tiles.transform(ref_logits[block], temperature, softcap)
        out[block] = tile_kl_grad(z, y, targets[block], lse[block], ref_lse[block], kl[block], grad_kl[block],
                                  grad_logp[block], policy_first, slope).to(out.dtype)
