"""Sequence-level objectives straight from hidden states: the entry point every loss family uses.

A loss head sees per-sequence log-probs arranged by loss group (a pair, a list,
a single KTO completion) and returns the loss of those groups, *additive over
groups* (a sum, or a sum divided by a constant). Every path of prefops.strategy
gives the same loss and gradients; plan_groups picks one:

stored, chunked   the 3-GEMM chunk loop of prefops.chunks: a chunk of groups' logits
                  materialised, the head run on them, their gradient formed at once;
sliced, lean      per-token log-probs from prefops.linear_logprobs (logits recomputed
                  in backward), summed per sequence, then the head once.

Sequence sharding (context parallelism, prefops.sequence_group): with `sequence_group`,
every rank holds a share of every sequence's tokens. The per-sequence sums are formed here
and in the chunk loop and nowhere else, and all-reduced before any head reads them (sliced
and lean: once; the chunk loop: once per chunk, the chunks planned alike on every rank).

Vocabulary sharding (prefops.vocab_parallel): with a Shard(0) DTensor weight or `vocab_group`, the
per-token op runs on each rank's rows and merges their statistics; such a call takes the strategy's
last per-token path (sliced for auto and sliced, lean for budget and lean) and records it. The chunk
loop would need each chunk's statistics all-reduced before its head: a collective per chunk, where the
per-token op needs one per call.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import torch

from . import fused, tiles, vocab_parallel
from . import strategy as strategy_module
from .checks import check_linear_inputs, check_targets_in_range
from .chunks import ChunkRows, budget_objective, plan_budget
from .config import BACKENDS, check_choice, get_settings
from .ops import linear_logprobs, token_outputs
from .per_sequence import _check_layout, _gather, _per_sequence, _sequence_stats, _stat_values
from .sequence_group import _sum_over, check_sequence_group, sequence_all_reduce
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


def sequence_objective(hidden, weight, targets, *, head: Callable, groups, seq_ids=None, token_weights=None,
                       bias=None, ignore_index=-100, temperature=1.0, softcap=None, stats=(),
                       strategy=None, budget=None, backend=None, sequence_group=None, vocab_group=None) -> Objective:
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
        vocab_group: weight and bias are this rank's vocabulary rows (see prefops.linear_logprobs; a
            Shard(0) DTensor weight needs no vocab_group): the loss and sums are the whole
            vocabulary's on every rank, hidden's gradient is exact, weight's is this rank's rows'.
    """
    shard = vocab_parallel.shard_of(weight, bias, vocab_group)
    if shard is not None:
        hidden = vocab_parallel.local_replicated(hidden, "hidden")
        weight, bias, vocab_group = shard.weight, shard.bias, shard.group
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
    if shard is None:
        plan = plan_groups(choice, flat_seq, counted, groups, num_sequences, weight, sequence_group,
                           row_scaled=_LogpRows.row_scaled)
    else:
        plan = strategy_module.record(strategy_module.group_paths(choice)[-1])
    if not isinstance(plan, str):
        check_targets_in_range(flat_targets, weight.shape[0], ignore_index)
        row_backend = fused.resolve_backend(check_choice(backend or settings.backend, BACKENDS, "backend"),
                                            hidden.device)
        count = sequence_all_reduce(_per_sequence(counted.float(), flat_seq, num_sequences), sequence_group)
        math = _LogpRows(head, groups, weights, counted.float(), count, set(stats), float(temperature), softcap,
                         row_backend)
        loss, sums = budget_objective(flat_hidden, weight, bias, flat_targets, math, plan, groups, flat_seq,
                                      num_sequences, sequence_group)
        return Objective(loss, sums["logps"], {"count": count, **{name: sums[name] for name in stats}})
    token_logp, _, *extras = token_outputs(flat_hidden, weight, torch.where(counted, flat_targets, ignore_index),
                                           bias=bias, ignore_index=ignore_index, temperature=temperature,
                                           softcap=softcap, extras=[STAT_EXTRAS[name] for name in stats
                                                                    if name in STAT_EXTRAS], backend=backend,
                                           strategy=plan, vocab_group=vocab_group)
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
                   ignore_index=-100, temperature=1.0, softcap=None, sequence_group=None,
                   vocab_group=None) -> torch.Tensor:
    """Per-sequence sums of token_weights * log p(target) on the forward-only fused path
    (nothing saved for backward): the reference model's side of every loss family.

    Layout as in sequence_objective: a padded [B, T] batch, or flat tokens with seq_ids (then
    num_sequences is needed with a sequence_group, whose totals are returned); vocab_group as there.
    """
    token = linear_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                            temperature=temperature, softcap=softcap, vocab_group=vocab_group)
    counted = targets != ignore_index
    weights = counted.float() if token_weights is None else torch.where(counted, token_weights.float(), 0.0)
    if seq_ids is None:
        sums = sequence_sum(token, weights, num_sequences=num_sequences)
    else:
        sums = sequence_sum(token.reshape(-1), weights.reshape(-1), seq_ids=seq_ids.reshape(-1),
                            num_sequences=num_sequences)
    return sequence_all_reduce(sums, check_sequence_group(sequence_group))


@torch.no_grad()
def reference_logps(ref_hidden, ref_weight, targets, *, precomputed=None, name="ref_hidden", **options):
    """The reference model's per-sequence log-prob sums from its hidden states (sequence_logps, forward-only),
    or None without ref_hidden: the reference side of PreferenceLoss, ListwiseLoss and UnpairedLoss.

    precomputed: the name of the precomputed reference log-probs the caller was also given (None if none);
    both at once is an error, as is ref_hidden without ref_weight. name: what ref_hidden is called there.
    options: sequence_logps's (seq_ids, num_sequences, token_weights, bias, sequence_group, ...).
    """
    if ref_hidden is None:
        return None
    if precomputed:
        raise ValueError(f"pass either {name}/ref_weight or {precomputed}, not both")
    if ref_weight is None:
        raise ValueError(f"{name} needs ref_weight")
    return sequence_logps(ref_hidden, ref_weight, targets, **options)


def plan_groups(choice, seq_ids, counted, groups, num_sequences, weight, sequence_group=None, sides=1,
                row_scaled=False):
    """The path a sequence-level objective runs, in prefops.strategy's order: a plan_budget plan
    for a 3-GEMM path (stored or chunked), else 'sliced' or 'lean' for the per-token op. Records it.
    row_scaled: the objective's math is (ChunkRows.row_scaled), so stored chunks may cut groups."""
    paths = strategy_module.group_paths(choice)
    if "chunked" in paths:
        plan = plan_budget(seq_ids, counted, groups, num_sequences, weight, choice.memory, sides=sides,
                           sequence_group=sequence_group, may_store="stored" in paths, split_groups=row_scaled)
        if plan is not None:
            strategy_module.record("stored" if plan[0] else "chunked")
            return plan
        if choice.strategy == "budget":
            warn_lean(stacklevel=3)
    return strategy_module.record(paths[-1])


def warn_lean(stacklevel):
    warnings.warn("a loss group does not fit the memory budget; using the lean strategy", stacklevel=stacklevel + 1)


class _LogpRows(ChunkRows):
    """The core op's per-token quantities: token_weights * log p(target), differentiated by the
    head, and the requested statistics (STAT_NAMES), passed to it as is."""

    differentiable = ("logps",)
    row_scaled = True

    def __init__(self, head, groups, weights, counted, count, wanted, temperature, softcap, backend):
        self.user_head, self.wanted = head, wanted
        self.group_count = _gather(count, groups)  # once: each chunk picks its groups' rows
        self.temperature, self.softcap, self.backend = temperature, softcap, backend
        self.weights = {"logps": weights, **{name: counted for name in wanted}}

    def token_values(self, logits, rows, targets):
        token = _chunk_token_stats(logits, targets, self.temperature, self.softcap, self.backend)
        stats = _stat_values(self.wanted, token.logp, token.entropy, token.sum_p2,
                             token.logit_sum / logits.shape[1], token.top1)
        return {"logps": token.logp, **stats}, token

    def head(self, sums, group_index):
        stats = {"count": self.group_count[group_index]}
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
