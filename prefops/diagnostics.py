"""Likelihood diagnostics from hidden states, forward only, without the N x V logits.

linear_diagnostics: per-token log p(target), entropy, top-k entropy and top-k
probability mass, sum_v p_v^2, from one pass over the vocabulary (the forward
statistics kernel with its top-k switched on, or the chunked PyTorch path).
sequence_diagnostics: their per-sequence means. ches_scores: the CHES score of
preference pairs from hidden states, to find the pairs that cause likelihood
displacement.

All logarithms are natural (nats). The top-k quantities are the two
over-optimisation indicators of Shi et al. 2024, "Understanding Likelihood
Over-optimisation in Direct Alignment Algorithms" (arXiv 2410.11677), with
T = the k largest logits of a row (exact, ties broken arbitrarily) and p the
full softmax:
    top_k_mass    = sum_{v in T} p_v                      (in (0, 1])
    top_k_entropy = -sum_{v in T} q_v log q_v,  q_v = p_v / top_k_mass
i.e. the entropy of the top-k distribution renormalised to sum to one (in
[0, log k]), so it measures how the model spreads its mass among its top
candidates independently of how much mass they hold. The unnormalised sum
-sum_{v in T} p_v log p_v equals top_k_mass * (top_k_entropy - log top_k_mass).
"""
from __future__ import annotations

from collections import namedtuple
from typing import NamedTuple, Optional

import torch

from . import fused, strategy, tiles, vocab_parallel
from .checks import check_linear_inputs, check_targets_in_range
from .config import BACKENDS, check_choice, get_settings
from .sequences import sequence_stats
from .token_kl import linear_token_kl

# Registers of the running top-k grow with k; past this the chunked PyTorch path serves.
MAX_TRITON_TOP_K = 64


class Diagnostics(NamedTuple):
    """Per-token diagnostics shaped like targets (fp32; 0 at ignored tokens).

    top_k_logp and top_k_ids add a trailing dimension k: the log-probabilities of the
    k most likely tokens, in descending order, and their ids (-1 at ignored tokens).
    kl_to_reference is None unless a reference model was given."""

    logp: torch.Tensor
    entropy: torch.Tensor
    top_k_entropy: torch.Tensor
    top_k_mass: torch.Tensor
    sum_p2: torch.Tensor
    kl_to_reference: Optional[torch.Tensor]
    top_k_logp: torch.Tensor
    top_k_ids: torch.Tensor


# The per-token scalars that sequence_diagnostics averages.
SCALAR_FIELDS = Diagnostics._fields[:6]
SequenceDiagnostics = namedtuple("SequenceDiagnostics", SCALAR_FIELDS + ("count",))
SequenceDiagnostics.__doc__ = "Per-sequence means [S] (fp32) of the Diagnostics scalars over counted tokens; counts."


def check_top_k(top_k, vocab_size: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be an int in [1, V = {vocab_size}]; got {top_k!r}")
    return top_k


def top_k_summary(values: torch.Tensor, lse: torch.Tensor):
    """(top_k_entropy, top_k_mass) [n] from the top-k logits [n, k] and the full logsumexp [n].

    Shifted by the row maximum and computed in float64, so logits of size 1e3 lose nothing."""
    shifted = values.double() - values[:, :1].double()
    lse_top = torch.logsumexp(shifted, dim=1)
    q = (shifted - lse_top[:, None]).exp()
    entropy = lse_top - (q * shifted).sum(1)
    mass = (lse_top + values[:, 0].double() - lse.double()).exp()
    return entropy.clamp_min(0.0).float(), mass.clamp_max(1.0).float()


def _resolve(backend, device, top_k):
    resolved = fused.resolve_backend(backend, device)
    if resolved == "triton" and top_k > MAX_TRITON_TOP_K:
        if backend == "triton":
            raise ValueError(f"top_k must be <= {MAX_TRITON_TOP_K} with backend='triton' (the running top-k lives "
                             f"in registers); got {top_k}. Use backend='torch' or 'auto' for larger k")
        return "torch"
    return resolved


@torch.no_grad()
def linear_diagnostics(hidden, weight, targets, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                       top_k=10, ref_hidden=None, ref_weight=None, ref_bias=None, kl_direction="policy_ref",
                       backend=None, vocab_group=None) -> Diagnostics:
    """Per-token likelihood diagnostics through the lm_head, forward only, without the N x V logits.

    Args:
        hidden: [..., H] final hidden states (bf16, fp16 or fp32); weight: [V, H]; bias: optional [V].
        targets: [...] token ids; ignore_index marks tokens that get no diagnostics (0 there).
        temperature, softcap: z = softcap * tanh((h W^T + b) / temperature / softcap), as linear_logprobs.
        top_k: k of the top-k entropy and mass (1 <= k <= V); see the module docstring for the
            definitions (renormalised top-k entropy, natural log).
        ref_hidden [..., H_ref], ref_weight [V, H_ref], ref_bias: the reference model. When given,
            kl_to_reference holds the per-token KL (nats) from prefops.token_kl.linear_token_kl,
            KL(p_θ || p_ref) by default or KL(p_ref || p_θ) with kl_direction='ref_policy'.
            That is a second pass over the vocabulary (policy and reference logits together).
        backend: 'auto', 'triton' or 'torch'; default from prefops.configure().
        vocab_group: weight (and ref_weight, and the biases) are this rank's rows of a vocabulary
            sharded over this process group (Shard(0) DTensors need none; prefops.vocab_parallel):
            each rank's top-k, then an all-gather of k logits and ids per token and their top-k.

    One pass over the vocabulary gives every field but the KL: the Triton statistics kernel
    with its streamed, exact top-k switched on (k <= 64), or the chunked PyTorch path.
    Nothing is saved for backward and nothing is differentiable.
    """
    shard = vocab_parallel.shard_of(weight, bias, vocab_group)
    vocab, start = weight.shape[0], 0
    if shard is not None:
        hidden = vocab_parallel.local_replicated(hidden, "hidden")
        weight, bias, vocab, start = shard.weight, shard.bias, shard.vocab, shard.start
    check_linear_inputs(hidden, weight, targets, bias, ignore_index=ignore_index, temperature=temperature,
                        softcap=softcap)
    top_k = check_top_k(top_k, vocab)
    with_reference = ref_hidden is not None or ref_weight is not None or ref_bias is not None
    if with_reference and (ref_hidden is None or ref_weight is None):
        raise ValueError("kl_to_reference needs both ref_hidden and ref_weight (ref_bias is optional)")
    settings = get_settings()
    requested = check_choice(backend or settings.backend, BACKENDS, "backend")
    check_targets_in_range(targets, vocab, ignore_index)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden_2d.stride(-1) != 1:
        hidden_2d = hidden_2d.contiguous()
    flat_targets = targets.reshape(-1)
    rows, counted_targets = fused.counted_rows(flat_targets, ignore_index)
    sliced, workspace = strategy.token_path()
    local_k = min(top_k, weight.shape[0])  # a shard may hold fewer than k rows
    token, values, ids = fused.token_stats(
        hidden_2d, weight.contiguous(), bias, rows, counted_targets - start, float(temperature),
        None if softcap is None else float(softcap), _resolve(requested, hidden.device, top_k),
        workspace, local_k, sliced=sliced, finalize=shard is None)
    if shard is not None:
        token = tiles.finalize(vocab_parallel.all_reduce_stats(token, shard.group))
        values, ids = vocab_parallel.merge_top_k(values, ids, shard, top_k)
    strategy.record("sliced" if sliced else "lean")
    top_entropy, top_mass = top_k_summary(values, token.lse)
    n, shape = flat_targets.numel(), targets.shape

    def scatter(value, fill=0):
        out = value.new_full((n,) + value.shape[1:], fill)
        return out.index_copy_(0, rows, value).view(shape + value.shape[1:])

    kl = None
    if with_reference:
        kl = linear_token_kl(hidden, weight, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias,
                             direction=kl_direction, mask=targets != ignore_index, temperature=temperature,
                             softcap=softcap, backend=requested, vocab_group=None if shard is None else shard.group)
    return Diagnostics(scatter(token.logp), scatter(token.entropy), scatter(top_entropy), scatter(top_mass),
                       scatter(token.sum_p2), kl, scatter(values - token.lse[:, None]), scatter(ids, -1))


def sequence_diagnostics(diagnostics: Diagnostics, targets, *, ignore_index=-100, cu_seqlens=None, seq_ids=None,
                         num_sequences=None) -> SequenceDiagnostics:
    """Per-sequence means of per-token diagnostics over the counted tokens (targets != ignore_index).

    Padded: diagnostics and targets [B, T]. Packed: flat [N] with cu_seqlens or seq_ids
    (see prefops.sequence_stats). A sequence with no counted token raises."""
    mask = targets != ignore_index
    layout = dict(cu_seqlens=cu_seqlens, seq_ids=seq_ids, num_sequences=num_sequences)
    means, count = {}, None
    for name in SCALAR_FIELDS:
        value = getattr(diagnostics, name)
        if value is None:
            means[name] = None
            continue
        stats = sequence_stats(value, mask, **layout)
        means[name], count = stats.mean, stats.count
    return SequenceDiagnostics(**means, count=count)


def _response_sum(hidden, mask, name):
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True where the position predicts a response token); "
                        f"got {mask.dtype}")
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # [B, 1, T] @ [B, T, H]: one batched GEMM accumulating in fp32.
    total = torch.bmm(mask.to(dtype).unsqueeze(1), hidden.to(dtype)).squeeze(1)
    count = mask.sum(1)
    empty = count == 0
    if bool(empty.any()):
        raise ValueError(f"{name}[{int(empty.nonzero()[0])}] selects no position, so its CHES score is undefined")
    return total, count.to(dtype)


def ches_scores(hidden_chosen, hidden_rejected, mask_chosen, mask_rejected, *, normalized=False) -> torch.Tensor:
    """CHES score of each preference pair (Razin et al. 2024, "Unintentional Unalignment:
    Likelihood Displacement in Direct Preference Optimization", arXiv 2410.08847):

        CHES    = <S+, S->  - ||S+||^2,     S+- = sum of h over the positions that predict
        ln-CHES = <S+/|y+|, S-/|y-|> - ||S+/|y+|||^2     response tokens (|y+-| of them)

    with h the final hidden states of the chosen (+) and rejected (-) sequences. A high
    score marks a pair whose responses the model embeds alike: those drive the likelihood
    displacement of the chosen response, and filtering the top-scored pairs mitigates it.

    Args:
        hidden_chosen: [B, T+, H]; hidden_rejected: [B, T-, H] (padded; T+ and T- may differ).
        mask_chosen, mask_rejected: bool [B, T+-], True at positions whose next token is a
            response token, i.e. targets != ignore_index in the shifted layout
            (hidden[:, :-1] predicts labels[:, 1:]).
        normalized: the length-normalised variant (ln-CHES).

    Returns [B] in fp32 (float64 for float64 input). Computed as <S+, S- - S+>, so the two
    large terms never cancel in floating point.
    """
    for name, value in (("hidden_chosen", hidden_chosen), ("hidden_rejected", hidden_rejected)):
        if not isinstance(value, torch.Tensor) or value.dim() != 3:
            raise ValueError(f"{name} must be a tensor of shape [B, T, H]; got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    if hidden_chosen.shape[0] != hidden_rejected.shape[0] or hidden_chosen.shape[2] != hidden_rejected.shape[2]:
        raise ValueError(f"hidden_chosen {tuple(hidden_chosen.shape)} and hidden_rejected "
                         f"{tuple(hidden_rejected.shape)} must agree in B (pairs) and H")
    for name, mask, hidden in (("mask_chosen", mask_chosen, hidden_chosen),
                               ("mask_rejected", mask_rejected, hidden_rejected)):
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"{name} must have shape {tuple(hidden.shape[:2])} (the hidden states' [B, T])")
    chosen, count_chosen = _response_sum(hidden_chosen, mask_chosen, "mask_chosen")
    rejected, count_rejected = _response_sum(hidden_rejected, mask_rejected, "mask_rejected")
    if normalized:
        chosen = chosen / count_chosen[:, None]
        rejected = rejected / count_rejected[:, None]
    return (chosen * (rejected - chosen)).sum(1)
