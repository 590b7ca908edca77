"""Sequence-level objectives straight from hidden states: the entry point every loss family uses.

A loss head sees per-sequence log-probs arranged by loss group (a pair, a list,
a single KTO completion) and returns the loss of those groups, *additive over
groups* (a sum, or a sum divided by a constant). Two strategies give the same
loss and gradients:

lean    per-token log-probs from prefops.linear_logprobs (logits recomputed in
        backward), summed per sequence, then the head; memory independent of
        sequence length and batch size.
budget  groups are packed into chunks whose logits fit `budget` bytes; for each
        chunk one GEMM materialises the logits (fp32 results of input-dtype
        operands, as lean computes them), the head runs on the chunk's groups,
        and d(hW^T) is written in the input dtype and turned into dh and dW by
        two GEMMs. Three GEMMs instead of four; backward only scales the stored
        gradients. Used when every group fits the budget, else lean.

The budget chunk loop (budget_objective) is shared with the per-token KL of the
TDPO losses (prefops.token_kl.sequence_kl_objective): a ChunkRows object says
which per-token values a chunk's logits give and how their gradient is formed.

Sequence sharding (context parallelism): with `sequence_group`, every rank of that
process group holds a share of every sequence's tokens. The per-sequence sums are
formed here and nowhere else, so they are all-reduced here, before any head reads
them (lean: once; budget: once per chunk, the chunks planned alike on every rank).
Every rank then evaluates the same loss of the global sums and differentiates it into
its own tokens only: h.grad is exact on each rank, and the weight gradients, each
rank's share, must be summed over the group (see sequence_all_reduce).
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import torch

from . import fused, tiles
from . import strategy as strategy_module
from .checks import check_linear_inputs, check_targets_in_range
from .config import BACKENDS, check_choice, get_settings
from .ops import linear_logprobs, token_outputs
from .sequences import sequence_sum

STAT_NAMES = ("entropy", "log_sum_p2", "logp", "mean_logit", "top1")
# The statistics that need an optional accumulator of the fused pass (ops.EXTRAS).
STAT_EXTRAS = {"entropy": "entropy", "log_sum_p2": "sum_p2", "mean_logit": "mean_logit"}
# Rows of materialised logits handled per elementwise pass in the budget strategy:
# bounds the fp32 temporaries to a few of these blocks.
_BLOCK_ROWS = 64


class Objective(NamedTuple):
    loss: torch.Tensor
    """Scalar loss returned by the head (differentiable)."""
    logps: torch.Tensor
    """[S] per-sequence sums of token_weights * log p(target) (detached)."""
    stats: dict
    """Per-sequence tensors (detached): 'count' (counted tokens) and the requested extras:
    'entropy' (sum of per-token entropies), 'log_sum_p2' (sum over tokens of log sum_v p_v^2),
    'logp' (the plain sum of log p(target), without token_weights), 'mean_logit' (sum over tokens
    of the mean logit sum_v z_v / V) and 'top1' (number of tokens whose target is an argmax of z,
    ties counting; see prefops.tiles)."""


def _check_layout(targets, seq_ids, groups, token_weights, sequence_group=None):
    if seq_ids is None:
        if targets.dim() != 2:
            raise ValueError("seq_ids is required unless targets is a padded batch [B, T]")
        seq_ids = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)
    if tuple(seq_ids.shape) != tuple(targets.shape):
        raise ValueError(f"seq_ids must have the shape of targets {tuple(targets.shape)}; got {tuple(seq_ids.shape)}")
    if seq_ids.dtype.is_floating_point:
        raise TypeError(f"seq_ids must be an integer tensor; got {seq_ids.dtype}")
    if not isinstance(groups, torch.Tensor) or groups.dim() != 2 or groups.dtype.is_floating_point:
        raise ValueError("groups must be an integer tensor [G, K] of sequence indices (-1 for an empty slot)")
    num_sequences = int(seq_ids.max()) + 1 if seq_ids.numel() else 0
    num_sequences = max(num_sequences, int(groups.max()) + 1 if groups.numel() else 0)
    # A rank may hold no token of the last sequences; the sums it reduces must have every rank's shape.
    num_sequences = max_over_group(num_sequences, sequence_group, targets.device)
    if groups.numel() and int(groups.min()) < -1:
        raise ValueError("groups entries must be sequence indices >= 0, or -1 for an empty slot")
    if token_weights is not None and tuple(token_weights.shape) != tuple(targets.shape):
        raise ValueError(f"token_weights must have the shape of targets {tuple(targets.shape)}; "
                         f"got {tuple(token_weights.shape)}")
    return seq_ids.reshape(-1).long().to(targets.device), groups.long().to(targets.device), num_sequences


def check_sequence_group(sequence_group):
    """sequence_group: None (each rank holds whole sequences) or an initialised ProcessGroup."""
    if sequence_group is None:
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("sequence_group needs torch.distributed initialised (init_process_group)")
    if not isinstance(sequence_group, torch.distributed.ProcessGroup):
        raise TypeError(f"sequence_group must be a torch.distributed.ProcessGroup or None; "
                        f"got {type(sequence_group).__name__}")
    return sequence_group


class _SequenceSum(torch.autograd.Function):
    """Sum over the sequence group, with the identity as backward.

    Every rank evaluates the same loss L of the same global sums g = sum_r s_r, so
    d L / d s_r = d L / d g, which each rank already holds. The all-reduce of
    torch.distributed.nn.functional.all_reduce sums the upstream gradients as well: it
    differentiates sum_r L_r, the group size times L here, and would scale every gradient by it."""

    @staticmethod
    def forward(ctx, partial, group):
        total = partial.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sequence_all_reduce(partial: torch.Tensor, sequence_group) -> torch.Tensor:
    """This rank's partial per-sequence sums -> the group's totals (partial itself without a group).

    Differentiable with the gradient of the one loss every rank computes from the totals: each rank
    backpropagates d loss / d total into its own tokens, so the gradients of shared parameters
    (the output weight) are per-rank shares that the caller sums over the group."""
    if sequence_group is None:
        return partial
    return _SequenceSum.apply(partial, sequence_group)


def _sum_over(sequence_group, values: dict) -> dict:
    """sequence_all_reduce of several same-shaped fp32 tensors in one collective."""
    if sequence_group is None:
        return values
    # Stacked by name: the ranks' dicts may come in other orders (built from sets, hashed per process).
    names = sorted(values)
    totals = sequence_all_reduce(torch.stack([values[name] for name in names]), sequence_group)
    return dict(zip(names, totals.unbind(0)))


def max_over_group(value: int, sequence_group, device) -> int:
    """The largest value over the group (a count of sequences every rank must agree on)."""
    if sequence_group is None:
        return value
    value = torch.tensor(value, device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=sequence_group)
    return int(value)


def _per_sequence(values, seq_ids, num_sequences):
    keep = seq_ids >= 0
    return values.new_zeros(num_sequences).index_add(0, seq_ids.clamp_min(0), torch.where(keep, values, 0.0))


def _gather(per_sequence, groups):
    """[S] -> [G, K], 0 in empty slots."""
    return torch.where(groups >= 0, per_sequence[groups.clamp_min(0)], 0.0)


def _stat_values(wanted, logp, entropy, sum_p2, mean_logit, top1):
    """Per-token values (detached) of the requested statistics, from one pass's outputs."""
    values = {"entropy": lambda: entropy.detach(), "logp": lambda: logp.detach(),
              "log_sum_p2": lambda: sum_p2.clamp_min(torch.finfo(torch.float32).tiny).log(),
              "mean_logit": lambda: mean_logit, "top1": lambda: top1.float()}
    return {name: values[name]() for name in wanted}


def _sequence_stats(values, counted, seq_ids, num_sequences):
    stats = {"count": _per_sequence(counted.float(), seq_ids, num_sequences)}
    for name, value in values.items():
        stats[name] = _per_sequence(torch.where(counted, value, 0.0), seq_ids, num_sequences)
    return stats


def sequence_objective(hidden, weight, targets, *, head: Callable, groups, seq_ids=None, token_weights=None,
                       bias=None, ignore_index=-100, temperature=1.0, softcap=None, stats=(),
                       strategy=None, budget=None, backend=None, sequence_group=None) -> Objective:
    """Loss of sequence-level heads computed from hidden states, without the N x V logits.

    Args:
        hidden [..., H], weight [V, H], targets [...]: as in prefops.linear_logprobs.
        head: head(logps [G', K], group_index [G'], stats {name: [G', K]}) -> scalar,
            additive over groups; group_index says which rows of `groups` it is given.
        groups: [G, K] sequence indices per loss group (-1 marks an empty slot).
        seq_ids: [...] sequence index of every token (-1 for none); defaults to the
            row index of a padded [B, T] batch.
        token_weights: [...] weights in the per-sequence sum (e.g. LD-DPO); default 1.
        stats: extra per-sequence statistics to pass to the head (detached, summed over the
            counted tokens without token_weights): 'entropy', 'log_sum_p2', 'logp', 'mean_logit',
            'top1' (see Objective.stats). They come from the same pass at no measurable cost.
        strategy, budget: 'lean' or 'budget' and its byte budget; default from prefops.configure().
        sequence_group: a torch.distributed ProcessGroup whose ranks each hold a share of every
            sequence's tokens (same groups and sequence numbering on every rank): the head sees
            the group's sums, the loss and Objective's sums are the group's on every rank, the
            gradients of hidden are exact and those of weight and bias are this rank's share
            (sum them over the group). Default None: this rank holds whole sequences.
    """
    check_linear_inputs(hidden, weight, targets, bias, ignore_index=ignore_index,
                        temperature=temperature, softcap=softcap)
    sequence_group = check_sequence_group(sequence_group)
    settings = get_settings()
    choice = strategy_module.resolve(strategy, budget)
    for name in stats:
        check_choice(name, STAT_NAMES, "stats entry")
    flat_seq, groups, num_sequences = _check_layout(targets, seq_ids, groups, token_weights, sequence_group)
    flat_targets = targets.reshape(-1)
    counted = (flat_targets != ignore_index) & (flat_seq >= 0)
    weights = counted.float() if token_weights is None else torch.where(counted, token_weights.reshape(-1).float(), 0.0)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    token_path = plan_groups(choice, flat_seq, counted, groups, num_sequences, weight, sequence_group)
    if not isinstance(token_path, str):
        check_targets_in_range(flat_targets, weight.shape[0], ignore_index)
        row_backend = fused.resolve_backend(check_choice(backend or settings.backend, BACKENDS, "backend"),
                                            hidden.device)
        count = sequence_all_reduce(_per_sequence(counted.float(), flat_seq, num_sequences), sequence_group)
        math = _LogpRows(head, groups, weights, counted.float(), count, set(stats), float(temperature), softcap,
                         row_backend)
        loss, sums = budget_objective(flat_hidden, weight, bias, flat_targets, math, token_path, groups, flat_seq,
                                      num_sequences, sequence_group)
        return Objective(loss, sums["logps"], {"count": count, **{name: sums[name] for name in stats}})
    token_logp, _, *extras = token_outputs(flat_hidden, weight, torch.where(counted, flat_targets, ignore_index),
                                           bias=bias, ignore_index=ignore_index, temperature=temperature,
                                           softcap=softcap, extras=[STAT_EXTRAS[name] for name in stats
                                                                    if name in STAT_EXTRAS], backend=backend,
                                           strategy=token_path)
    logps = _per_sequence(token_logp * weights, flat_seq, num_sequences)
    seq_stats = _sequence_stats(_stat_values(stats, token_logp, *extras), counted, flat_seq, num_sequences)
    if sequence_group is not None:
        seq_stats = _sum_over(sequence_group, {"logps": logps, **seq_stats})
        logps = seq_stats.pop("logps")
        seq_stats = {name: value.detach() for name, value in seq_stats.items()}
    group_index = torch.arange(groups.shape[0], device=groups.device)
    loss = head(_gather(logps, groups), group_index, {k: _gather(v, groups) for k, v in seq_stats.items()})
    return Objective(loss, logps.detach(), seq_stats)


@torch.no_grad()
def sequence_logps(hidden, weight, targets, *, seq_ids=None, num_sequences=None, token_weights=None, bias=None,
                   ignore_index=-100, temperature=1.0, softcap=None, sequence_group=None) -> torch.Tensor:
    """Per-sequence sums of token_weights * log p(target) on the forward-only fused path
    (nothing saved for backward): the reference model's side of every loss family.

    Layout as in sequence_objective: a padded [B, T] batch, or flat tokens with seq_ids (then
    num_sequences is needed with a sequence_group, whose totals are returned).
    """
    token = linear_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                            temperature=temperature, softcap=softcap)
    counted = targets != ignore_index
    weights = counted.float() if token_weights is None else torch.where(counted, token_weights.float(), 0.0)
    if seq_ids is None:
        sums = sequence_sum(token, weights, num_sequences=num_sequences)
    else:
        sums = sequence_sum(token.reshape(-1), weights.reshape(-1), seq_ids=seq_ids.reshape(-1),
                            num_sequences=num_sequences)
    return sequence_all_reduce(sums, check_sequence_group(sequence_group))


def plan_groups(choice, seq_ids, counted, groups, num_sequences, weight, sequence_group=None, sides=1):
    """The path a sequence-level objective runs, in prefops.strategy's order: a plan_budget plan
    for a 3-GEMM path (stored or chunked), else 'sliced' or 'lean' for the per-token op. Records it."""
    paths = strategy_module.group_paths(choice)
    if "chunked" in paths:
        plan = plan_budget(seq_ids, counted, groups, num_sequences, weight, choice.memory, sides=sides,
                           sequence_group=sequence_group, may_store="stored" in paths)
        if plan is not None:
            strategy_module.record("stored" if plan[0] else "chunked")
            return plan
        if choice.strategy == "budget":
            warn_lean(stacklevel=3)
    return strategy_module.record(paths[-1])


def warn_lean(stacklevel):
    warnings.warn("a loss group does not fit the memory budget; using the lean strategy", stacklevel=stacklevel + 1)


def budget_bytes_per_logit(dtype: torch.dtype, sides: int = 1) -> int:
    """Bytes a budget chunk holds per row and vocabulary entry: `sides` fp32 logits, plus the
    gradient tile in the input dtype when that is not fp32 (fp32 gradients overwrite the logits)."""
    return 4 * sides + (0 if dtype == torch.float32 else torch.empty((), dtype=dtype).element_size())


def plan_budget(seq_ids, counted, groups, num_sequences, weight, budget, sides=1, sequence_group=None,
                may_store=False):
    """Chunks of whole groups whose logits (`sides` [rows, V] tensors) fit the budget, or None if
    some group does not.

    With a sequence_group, every rank gets the same chunks of groups (sized by the largest share of
    each group on any rank), so that the ranks reduce each chunk's sums together.

    may_store: plan the stored path when it fits (the logit gradient of every row kept in the
    input dtype, and the chunks' fp32 logits in what is left); never under a sequence_group,
    whose ranks must agree on the chunks.

    Returns (stored, [(group indices, this rank's counted row indices sorted by group), ...])."""
    group_of_sequence = torch.full((num_sequences,), -1, dtype=torch.long, device=groups.device)
    slots = groups >= 0
    group_of_sequence[groups[slots]] = torch.arange(groups.shape[0], device=groups.device)[:, None].expand_as(
        groups)[slots]
    rows = counted.nonzero().squeeze(1)
    row_group = group_of_sequence[seq_ids[rows]]
    rows, row_group = rows[row_group >= 0], row_group[row_group >= 0]
    order = torch.argsort(row_group, stable=True)
    rows, row_group = rows[order], row_group[order]
    tokens_per_group = torch.bincount(row_group, minlength=groups.shape[0])
    first_row = [0] + tokens_per_group.cumsum(0).tolist()
    if sequence_group is not None:
        torch.distributed.all_reduce(tokens_per_group, op=torch.distributed.ReduceOp.MAX, group=sequence_group)
    sizes = tokens_per_group.tolist()
    largest, vocab = max(sizes, default=0), weight.shape[0]
    stored_bytes = rows.numel() * vocab * weight.element_size()
    stored = may_store and sequence_group is None and largest * vocab * 4 * sides <= budget - stored_bytes
    if stored:
        limit = (budget - stored_bytes) // (vocab * 4 * sides)
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
        grad_w = fused.WeightGrad(weight, fp32_weight_grad or weight.dtype == torch.float32) \
            if needs[1] and chunked else None
        grad_b = torch.zeros(vocab, device=hidden.device) if needs[2] and chunked else None
        all_rows = torch.cat([rows for _, rows in run.plan]) if stored else None
        logit_grads = hidden.new_empty(all_rows.numel(), vocab, dtype=weight.dtype) if stored else None
        offset = 0
        sums = {name: hidden.new_zeros(run.num_sequences, dtype=torch.float32) for name in math.weights}
        loss = hidden.new_zeros((), dtype=torch.float32)
        for group_index, rows in run.plan:
            slots = run.groups[group_index]
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
                    sums[name].index_add_(0, seq, value * weights[name])
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
                token_grads = {}
                for name, grad in zip(math.differentiable, grads):
                    grad_sequence = loss.new_zeros(run.num_sequences)
                    if grad is not None:
                        grad_sequence.index_add_(0, slots[slots >= 0], grad[slots >= 0])
                    token_grads[name] = grad_sequence.index_select(0, seq) * weights[name]
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
                grad_w.add(0, vocab, tile, h_rows)
            if grad_b is not None:
                grad_b += tile.sum(0, dtype=torch.float32)
            del tile
        run.sums = sums
        ctx.stored, ctx.needs = stored, needs
        if stored:
            ctx.save_for_backward(hidden, weight, bias, logit_grads, all_rows)
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


def _stored_grads(hidden, weight, bias, logit_grads, rows, grad_loss, needs):
    """dh, dW, db from the stored logit gradients G [n, V] of the rows, times the upstream grad_loss.

    dh: one GEMM with fp32 output, scaled, rounded once. dW = G^T (grad_loss h): one GEMM with fp32
    accumulation, written once; grad_loss scales the n x H operand rather than the V x H result
    (h * grad_loss is exact at the usual grad_loss of 1, else rounded once to the input dtype)."""
    grad_h = grad_w = grad_b = None
    if needs[0]:
        grad_h = torch.zeros_like(hidden).index_copy_(
            0, rows, (fused.matmul_fp32(logit_grads, weight) * grad_loss).to(hidden.dtype))
    if needs[1]:
        h_rows = (hidden.index_select(0, rows).float() * grad_loss).to(hidden.dtype)
        if logit_grads.dtype == h_rows.dtype == weight.dtype:
            grad_w = logit_grads.t() @ h_rows
        else:
            grad_w = fused.matmul_fp32(logit_grads.t(), h_rows).to(weight.dtype)
    if needs[2]:
        grad_b = (logit_grads.sum(0, dtype=torch.float32) * grad_loss).to(bias.dtype)
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


class _LogpRows(ChunkRows):
    """The core op's per-token quantities: token_weights * log p(target), differentiated by the
    head, and the requested statistics (STAT_NAMES), passed to it as is."""

    differentiable = ("logps",)

    def __init__(self, head, groups, weights, counted, count, wanted, temperature, softcap, backend):
        self.user_head, self.groups, self.count, self.wanted = head, groups, count, wanted
        self.temperature, self.softcap, self.backend = temperature, softcap, backend
        self.weights = {"logps": weights, **{name: counted for name in wanted}}

    def token_values(self, logits, rows, targets):
        token = _chunk_token_stats(logits, targets, self.temperature, self.softcap, self.backend)
        stats = _stat_values(self.wanted, token.logp, token.entropy, token.sum_p2,
                             token.logit_sum / logits.shape[1], token.top1)
        return {"logps": token.logp, **stats}, token

    def head(self, sums, group_index):
        stats = {"count": _gather(self.count, self.groups[group_index])}
        stats.update({name: sums[name].detach() for name in self.wanted})
        return self.user_head(sums["logps"], group_index, stats)

    def logit_grads(self, logits, targets, saved, grads, out):
        _logit_grads(logits, targets, saved, grads["logps"], out, self.temperature, self.softcap, self.backend)


def _chunk_token_stats(logits, targets, temperature, softcap, backend) -> tiles.Token:
    if backend == "triton":
        from .kernels.rows_stats import launch_rows_stats

        return tiles.finalize(launch_rows_stats(logits, targets, temperature, softcap))
    parts = []
    for r0 in range(0, logits.shape[0], _BLOCK_ROWS):
        z = tiles.transform(logits[r0:r0 + _BLOCK_ROWS], temperature, softcap)
        parts.append(tiles.finalize(tiles.tile_stats(z, targets[r0:r0 + _BLOCK_ROWS])))
    return tiles.Token(*(torch.cat(column) for column in zip(*parts)))


def _logit_grads(logits, targets, token, grad_logp, out, temperature, softcap, backend):
    if backend == "triton":
        from .kernels.rows_grad import launch_rows_grad

        launch_rows_grad(logits, out, targets, token.lse, grad_logp, torch.zeros_like(grad_logp), temperature,
                         softcap)
        return
    for r0 in range(0, logits.shape[0], _BLOCK_ROWS):
        block = slice(r0, r0 + _BLOCK_ROWS)
        z, slope = tiles.transform_with_slope(logits[block], temperature, softcap)
        grad = tiles.tile_grad(z, targets[block], token.lse[block], None, grad_logp[block],
                               torch.zeros_like(grad_logp[block]), None, slope)
        out[block] = grad.to(out.dtype)
