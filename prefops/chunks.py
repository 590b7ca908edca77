"""The 3-GEMM paths' chunk loop (prefops.strategy: stored and chunked), shared by the log-prob
objectives and the per-token KL of the TDPO losses (prefops.token_kl).

Groups are packed into chunks whose fp32 logits fit the memory; for each chunk one GEMM
materialises the logits (fp32 results of input-dtype operands, as every path computes them), a
ChunkRows object turns them into per-token values, the head runs on the chunk's groups, and the
logit gradient is formed in the input dtype. Chunked: each chunk's dh and dW GEMMs follow at
once. Stored: every chunk's gradient is kept, and backward runs one dh and one dW GEMM.

Stored with row-scaled math (ChunkRows.row_scaled, the log-prob objectives): a row's logit
gradient is its upstream gradient g_r times a row that does not depend on g_r,
    dL/dz_rv = g_r ([v = target_r] - p_rv) * slope_rv,
so the chunks keep that unit row, the head runs once after the loop (not once a chunk), and
backward folds g into its GEMMs: dh_r = g_r (U W)_r in fp32, dW = U^T (g h). Why: the head and
its autograd are ~60 small launches, and once a chunk they left the GPU waiting for the host
(H200, 2026-12-04: 24.7 ms of GPU work against 28.6 ms of wall time a step at 4 x 1024 tokens).
"""
from __future__ import annotations

import itertools

import torch

from . import fused
from .config import get_settings
from .determinism import index_add
from .per_sequence import _gather
from .sequence_group import _sum_over


def budget_bytes_per_logit(dtype: torch.dtype, sides: int = 1) -> int:
    """Bytes a budget chunk holds per row and vocabulary entry: `sides` fp32 logits, plus the
    gradient tile in the input dtype when that is not fp32 (fp32 gradients overwrite the logits)."""
    return 4 * sides + (0 if dtype == torch.float32 else torch.empty((), dtype=dtype).element_size())


# Fewest rows a chunk of the stored path's row-split plan may have: smaller GEMMs lose speed.
MIN_SPLIT_ROWS = 256


def plan_budget(seq_ids, counted, groups, num_sequences, weight, budget, sides=1, sequence_group=None,
                may_store=False, split_groups=False):
    """Chunks of whole groups whose logits (`sides` [rows, V] tensors) fit the budget, or None if
    some group does not.

    With a sequence_group, every rank gets the same chunks of groups (sized by the largest share of
    each group on any rank), so that the ranks reduce each chunk's sums together.

    may_store: plan the stored path when it fits (the logit gradient of every row kept in the
    input dtype, and the chunks' fp32 logits in what is left); never under a sequence_group,
    whose ranks must agree on the chunks.
    split_groups: the stored path may cut groups across chunks (row-scaled math runs the head once
    after the loop), so it needs room for MIN_SPLIT_ROWS rows' logits at most, not a whole group's; its
    chunks then carry no group indices (None).

    Returns (stored, [(group indices, this rank's counted row indices sorted by group), ...])."""
    device, n_groups = groups.device, groups.shape[0]
    # Everything on the device and one read of the counts at the end: the plan is the only host
    # sync of the 3-GEMM paths (a boolean mask, nonzero or bincount would each be one more).
    # Group n_groups stands for "none": sequences in no group, uncounted tokens; it sorts last.
    group_of_sequence = torch.full((num_sequences + 1,), n_groups, dtype=torch.long, device=device)
    slot_group = torch.arange(n_groups, device=device)[:, None].expand_as(groups)
    # Empty slots (-1) write to the spare last entry, which is cut off.
    group_of_sequence.scatter_(0, torch.where(groups >= 0, groups, num_sequences).flatten(), slot_group.flatten())
    row_group = torch.where(counted, group_of_sequence[:num_sequences][seq_ids.clamp_min(0)], n_groups)
    order = torch.argsort(row_group, stable=True)
    tokens_per_group = torch.zeros(n_groups + 1, dtype=torch.long, device=device).index_add_(
        0, row_group, torch.ones_like(row_group))[:n_groups]
    reduced = tokens_per_group
    if sequence_group is not None:
        reduced = tokens_per_group.clone()
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX, group=sequence_group)
    local_sizes, sizes = torch.stack([tokens_per_group, reduced]).tolist()
    first_row = [0, *itertools.accumulate(local_sizes)]
    rows = order[:first_row[-1]]
    largest, vocab = max(sizes, default=0), weight.shape[0]
    stored_bytes = rows.numel() * vocab * weight.element_size()
    needed = min(MIN_SPLIT_ROWS, largest) if split_groups else largest
    stored = may_store and sequence_group is None and needed * vocab * 4 * sides <= budget - stored_bytes
    if stored:
        limit = (budget - stored_bytes) // (vocab * 4 * sides)
        if split_groups:
            return stored, [(None, part) for part in rows.split(max(1, limit))]
    else:
        limit = max(1, budget // (vocab * budget_bytes_per_logit(weight.dtype, sides)))
        if largest > limit:
            return None
    bounds, used = [0], 0
    for group, count in enumerate(sizes):
        if used + count > limit:
            bounds.append(group)
            used = 0
        used += count
    bounds.append(len(sizes))
    return stored, [(torch.arange(g0, g1, device=groups.device), rows[first_row[g0]:first_row[g1]])
                    for g0, g1 in zip(bounds, bounds[1:])]


class ChunkRows:
    """What the budget strategy's chunk loop asks of a family of per-token quantities: the
    statistics of a chunk's materialised logits, the head on the chunk's groups, and the
    logit gradient formed in place. The core op (log p(target)) and the per-token KL
    (prefops.token_kl) are the two implementations.

    weights: {name: [N] per-token weights}; the loop sums weight * value per sequence for
        every name token_values returns.
    differentiable: the names whose per-sequence sums the head is differentiated in.
    """

    weights: dict
    differentiable: tuple
    row_scaled = False
    """True when one name is differentiable and logit_grads is linear in its per-token gradient,
    row by row: the stored path then runs the head once (see the module's docstring)."""

    def token_values(self, logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> tuple[dict, object]:
        """({name: [n] per-token values}, what the gradient needs) of a chunk; rows index the flat
        tokens, targets are theirs."""
        raise NotImplementedError

    def head(self, sums: dict, group_index: torch.Tensor) -> torch.Tensor:
        """Loss of the groups group_index from their per-sequence sums {name: [G', K]}."""
        raise NotImplementedError

    def logit_grads(self, logits: torch.Tensor, targets: torch.Tensor, saved, grads: dict, out: torch.Tensor) -> None:
        """Write d loss / d logits into out (the input dtype; logits itself when that is fp32), given
        {name: [n] d loss / d value} per token."""
        raise NotImplementedError


def budget_objective(hidden, weight, bias, targets, math: ChunkRows, plan, groups, seq_ids, num_sequences,
                     sequence_group=None):
    """The 3-GEMM paths' loss (differentiable in hidden, weight, bias) and the per-sequence sums
    {name: [S]} (detached) of every value math produces. hidden [N, H], targets [N]; plan from
    plan_budget (stored or chunked). With a sequence_group (and a plan_budget plan made with it)
    the sums are the group's."""
    stored, chunks = plan
    run = _BudgetRun(math, chunks, stored, groups, seq_ids, num_sequences, sequence_group)
    loss = _BudgetObjective.apply(hidden, weight, bias, targets, run, get_settings().fp32_weight_grad)
    return loss, run.sums


class _BudgetRun:
    """What the 3-GEMM paths need besides tensors, and what they hand back."""

    def __init__(self, math, plan, stored, groups, seq_ids, num_sequences, sequence_group):
        self.math, self.plan, self.groups, self.seq_ids, self.num_sequences = math, plan, groups, seq_ids, num_sequences
        self.stored, self.sequence_group = stored, sequence_group
        self.sums = None


class _BudgetObjective(torch.autograd.Function):
    """Chunked: each chunk's dh and dW GEMMs run in forward and backward scales the results.
    Stored: each chunk's logit gradient goes into one [rows, V] buffer in the input dtype, and
    backward runs one dh GEMM and one dW GEMM over all of it (dW written once, not accumulated)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, run, fp32_weight_grad):
        vocab, math = weight.shape[0], run.math
        needs = ctx.needs_input_grad[:2] + (bias is not None and ctx.needs_input_grad[2],)
        stored = run.stored and any(needs)
        chunked = not run.stored
        grad_h = torch.zeros_like(hidden) if needs[0] and chunked else None
        # Every chunk's dW GEMM spans the whole vocabulary: the first with rows writes all of it.
        grad_w = fused.WeightGrad(weight, fp32_weight_grad or weight.dtype == torch.float32,
                                  written_whole=any(rows.numel() for _, rows in run.plan)) \
            if needs[1] and chunked else None
        dw_written = False
        grad_b = torch.zeros(vocab, device=hidden.device) if needs[2] and chunked else None
        all_rows = torch.cat([rows for _, rows in run.plan]) if stored else None
        logit_grads = hidden.new_empty(all_rows.numel(), vocab, dtype=weight.dtype) if stored else None
        # A row-scaled plan's chunks may cut groups (plan_budget's split_groups): the head runs once.
        head_once = run.stored and math.row_scaled
        offset = 0
        sums = {name: hidden.new_zeros(run.num_sequences, dtype=torch.float32) for name in math.weights}
        loss = hidden.new_zeros((), dtype=torch.float32)
        for group_index, rows in run.plan:
            # Under a sequence group a rank may hold no token of a chunk; it still joins its reduction and head.
            has_rows = rows.numel() > 0
            if has_rows:
                h_rows = hidden.index_select(0, rows)
                local_targets = targets.index_select(0, rows)
                logits = materialise(h_rows, weight, bias)
                seq = run.seq_ids.index_select(0, rows)
                weights = {name: w.index_select(0, rows) for name, w in math.weights.items()}
                values, saved = math.token_values(logits, rows, local_targets)
                for name, value in values.items():
                    sums[name] = index_add(sums[name], seq, value * weights[name])
            if head_once:
                if has_rows and stored:
                    unit = {math.differentiable[0]: torch.ones_like(local_targets, dtype=torch.float32)}
                    math.logit_grads(logits, local_targets, saved, unit, logit_grads[offset:offset + rows.numel()])
                    offset += rows.numel()
                if has_rows:
                    del logits, saved  # before the next chunk's GEMM allocates its own
                continue
            slots = run.groups[group_index]
            if run.sequence_group is not None:
                # The chunk's sequences are summed in this chunk only (a sequence is in one group).
                totals = _sum_over(run.sequence_group, {name: _gather(total, slots) for name, total in sums.items()})
                filled = slots >= 0
                for name, total in sums.items():
                    total.index_copy_(0, slots[filled], totals[name][filled])
            chunk_sums = {name: _gather(total, slots) for name, total in sums.items()}
            inputs = [chunk_sums[name].requires_grad_() for name in math.differentiable]
            with torch.enable_grad():
                chunk_loss = math.head(chunk_sums, group_index)
                grads = torch.autograd.grad(chunk_loss, inputs, allow_unused=True)
            loss += chunk_loss.detach()
            if not has_rows:
                continue
            tile = None
            if any(needs):
                token_grads = _token_grads(math, grads, slots, seq, weights, run.num_sequences)
                if stored:
                    tile = logit_grads[offset:offset + rows.numel()]
                    offset += rows.numel()
                else:
                    tile = logits if weight.dtype == torch.float32 else torch.empty_like(logits, dtype=weight.dtype)
                math.logit_grads(logits, local_targets, saved, token_grads, tile)
            # The GEMMs need only the gradient tile: the fp32 logits go first, and every buffer of
            # this chunk before the next chunk's GEMM allocates its own (the budget holds one chunk).
            del logits, saved
            if grad_h is not None:
                # One GEMM over the whole vocabulary: fp32 accumulation, one rounding to h's dtype.
                grad_h.index_copy_(0, rows, tile @ weight)
            if grad_w is not None:
                grad_w.add(0, vocab, tile, h_rows, first=not dw_written)
                dw_written = True
            if grad_b is not None:
                grad_b += tile.sum(0, dtype=torch.float32)
            del tile
        run.sums = sums
        ctx.stored, ctx.needs = stored, needs
        if head_once:
            slots = run.groups
            group_sums = {name: _gather(total, slots) for name, total in sums.items()}
            everything = torch.arange(slots.shape[0], device=slots.device)
            if not stored:
                return math.head(group_sums, everything).detach().float()
            inputs = [group_sums[name].requires_grad_() for name in math.differentiable]
            with torch.enable_grad():
                head_loss = math.head(group_sums, everything)
                grads = torch.autograd.grad(head_loss, inputs, allow_unused=True)
            loss = head_loss.detach().float()
            seq = run.seq_ids.index_select(0, all_rows)
            weights = {name: w.index_select(0, all_rows) for name, w in math.weights.items()}
            row_scale = _token_grads(math, grads, slots, seq, weights, run.num_sequences)[math.differentiable[0]]
            ctx.save_for_backward(hidden, weight, bias, logit_grads, all_rows, row_scale)
            return loss
        if stored:
            ctx.save_for_backward(hidden, weight, bias, logit_grads, all_rows, None)
            return loss
        ctx.save_for_backward(*(g for g in (grad_h, grad_w.result() if grad_w else None,
                                            grad_b.to(bias.dtype) if grad_b is not None else None)
                                if g is not None))
        ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.stored:
            return (*_stored_grads(*ctx.saved_tensors, grad_loss, ctx.needs), None, None, None)
        saved = iter(ctx.saved_tensors)
        grads = []
        for present in ctx.present:
            grad = next(saved) if present else None
            grads.append(None if grad is None else (grad * grad_loss).to(grad.dtype))
        return (*grads, None, None, None)


def _token_grads(math, grads, slots, seq, weights, num_sequences):
    """{name: [n] d loss / d value} per token from the head's gradients [G', K] of the groups slots."""
    token_grads = {}
    for name, grad in zip(math.differentiable, grads):
        grad_sequence = slots.new_zeros(num_sequences, dtype=torch.float32)
        if grad is not None:
            # Empty slots add 0 to sequence 0: a boolean mask here would sync the host every chunk.
            grad_sequence = index_add(grad_sequence, slots.clamp_min(0).flatten(),
                                      torch.where(slots >= 0, grad, 0.0).flatten())
        token_grads[name] = grad_sequence.index_select(0, seq) * weights[name]
    return token_grads


def _stored_grads(hidden, weight, bias, logit_grads, rows, row_scale, grad_loss, needs):
    """dh, dW, db from the stored logit gradients G [n, V] of the rows (per unit of each row's
    upstream gradient when row_scale [n] is given), times the upstream grad_loss.

    dh: one GEMM with fp32 output, its rows scaled, rounded once. dW = G^T (s h): one GEMM with fp32
    accumulation, written once; the row scales s multiply the n x H operand rather than the V x H
    result (s h rounded once to the input dtype; exact when s is grad_loss = 1). db = s^T G with s
    split into two input-dtype parts (hi + lo), so that bf16 does not round it."""
    scale = grad_loss.float() if row_scale is None else row_scale * grad_loss
    rows_scale = scale if scale.dim() == 0 else scale[:, None]
    grad_h = grad_w = grad_b = None
    if needs[0]:
        grad_h = torch.zeros_like(hidden).index_copy_(
            0, rows, (fused.matmul_fp32(logit_grads, weight) * rows_scale).to(hidden.dtype))
    if needs[1]:
        h_rows = (hidden.index_select(0, rows).float() * rows_scale).to(hidden.dtype)
        if logit_grads.dtype == h_rows.dtype == weight.dtype:
            grad_w = logit_grads.t() @ h_rows
        else:
            grad_w = fused.matmul_fp32(logit_grads.t(), h_rows).to(weight.dtype)
    if needs[2]:
        if row_scale is None:
            grad_b = logit_grads.sum(0, dtype=torch.float32) * grad_loss
        else:
            high = scale.to(logit_grads.dtype)
            parts = torch.stack([high, (scale - high.float()).to(logit_grads.dtype)])
            grad_b = fused.matmul_fp32(parts, logit_grads).sum(0)
        grad_b = grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


# Vocabulary rows of W upcast at a time by the CPU GEMM, so no fp32 copy of W is made.
_CPU_VOCAB_BLOCK = 4096


def materialise(h_rows, weight, bias):
    """fp32 logits [n, V] of one chunk from operands in the input dtype: never rounded to bf16,
    so the budget strategy's values carry only fp32 accumulation error, like lean's."""
    if h_rows.is_cuda or weight.dtype == torch.float32:
        logits = fused.matmul_fp32(h_rows, weight.t())
    else:
        logits = h_rows.new_empty(h_rows.shape[0], weight.shape[0], dtype=torch.float32)
        h32 = h_rows.float()
        for v0 in range(0, weight.shape[0], _CPU_VOCAB_BLOCK):
            torch.mm(h32, weight[v0:v0 + _CPU_VOCAB_BLOCK].float().t(), out=logits[:, v0:v0 + _CPU_VOCAB_BLOCK])
    return logits if bias is None else logits.add_(bias.float())
