"""Public fused ops, registered with torch.library so torch.compile traces them whole.

linear_logprobs: log p(target | hidden) = z_target - logsumexp(z), z = f(hidden W^T + b),
without the N x V logits. Forward keeps lse and entropy per counted token (8 bytes);
backward recomputes the logits blockwise (prefops/fused.py schedules the chunks).
The same pass also yields, undifferentiated and never saved for backward, sum_v p_v^2,
the mean logit sum_v z_v / V and whether the target is the argmax (token_outputs).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import fused
from . import strategy as strategy_module
from . import vocab_parallel
from .checks import check_linear_inputs, check_targets_in_range
from .config import BACKENDS, check_choice, get_settings


class LogProbs(NamedTuple):
    """Per-token outputs of one fused pass (fp32, 0 where the target is ignored).

    lse and entropy are differentiable; sum_p2 (sum_v p_v^2, the WPO statistic) is not."""

    logp: torch.Tensor
    lse: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    sum_p2: Optional[torch.Tensor]


def _scatter(rows, values, n):
    return values.new_zeros(n).index_copy_(0, rows, values)


def _forward_impl(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  targets: torch.Tensor, ignore_index: int, temperature: float,
                  softcap: Optional[float], backend: str, workspace: int, sliced: bool,
                  extras: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor]:
    """hidden [N, H], targets [N] -> (logp, lse, entropy, sum_p2, mean_logit) [N] fp32 and top1 [N] bool.

    extras: [entropy, sum_p2, mean_logit] to compute; an output left out is all zeros.
    sliced: cuBLAS slices and the row kernels (prefops.strategy's sliced path), else the lean kernels."""
    check_targets_in_range(targets, weight.shape[0], ignore_index)
    rows, counted_targets = fused.counted_rows(targets, ignore_index)
    token = fused.token_stats(hidden, weight, bias, rows, counted_targets, temperature, softcap,
                              fused.resolve_backend(backend, hidden.device), workspace, extras=tuple(extras),
                              sliced=sliced)
    n = targets.numel()
    token = token._replace(logit_sum=token.logit_sum / weight.shape[0])
    wanted = (True, True, *extras, True)
    return tuple(_scatter(rows, value, n) if keep else value.new_zeros(n) for value, keep in zip(token, wanted))


linear_logprobs_forward = torch.library.custom_op("prefops::linear_logprobs", mutates_args=())(_forward_impl)


@linear_logprobs_forward.register_fake
def _(hidden, weight, bias, targets, ignore_index, temperature, softcap, backend, workspace, sliced, extras):
    n = targets.numel()
    return (*(hidden.new_empty(n, dtype=torch.float32) for _ in range(5)), hidden.new_empty(n, dtype=torch.bool))


def _backward_impl(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                             grad_logp: torch.Tensor, grad_lse: torch.Tensor, grad_entropy: Optional[torch.Tensor],
                             ignore_index: int, temperature: float, softcap: Optional[float], backend: str,
                             workspace: int, sliced: bool, fp32_weight_grad: bool, needs: list[bool]
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dh [N, H], dW [V, H], db [V]); an unneeded one comes back empty."""
    rows, counted_targets = fused.counted_rows(targets, ignore_index)
    pick = lambda value: None if value is None else value.index_select(0, rows).float()  # noqa: E731
    grads = fused.token_grads(
        hidden, weight, bias, rows, counted_targets, pick(lse), pick(entropy), pick(grad_logp), pick(grad_lse),
        pick(grad_entropy), temperature, softcap, fused.resolve_backend(backend, hidden.device), workspace,
        fp32_weight_grad, tuple(needs), sliced=sliced,
    )
    return tuple(hidden.new_empty(0) if grad is None else grad for grad in grads)


linear_logprobs_backward = torch.library.custom_op("prefops::linear_logprobs_backward",
                                                   mutates_args=())(_backward_impl)


@linear_logprobs_backward.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_lse, grad_entropy, ignore_index, temperature,
      softcap, backend, workspace, sliced, fp32_weight_grad, needs):
    return (torch.empty_like(hidden) if needs[0] else hidden.new_empty(0),
            torch.empty_like(weight) if needs[1] else hidden.new_empty(0),
            torch.empty_like(bias) if needs[2] else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, temperature, softcap, backend, workspace, sliced, extras = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1], output[2])
    ctx.options = (ignore_index, temperature, softcap, backend, workspace, get_settings().fp32_weight_grad)
    ctx.sliced = sliced  # an attribute: prefops.tools.compare reads the path that ran off the graph
    ctx.entropy = extras[0]
    # An entropy that was not computed (zeros) must not pass a gradient on.
    ctx.mark_non_differentiable(*output[3:], *([] if extras[0] else [output[2]]))


def _backward(ctx, grad_logp, grad_lse, grad_entropy, *_not_differentiable):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    ignore_index, temperature, softcap, backend, workspace, fp32_weight_grad = ctx.options
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    zeros = lambda: torch.zeros_like(lse)  # noqa: E731
    grad_h, grad_w, grad_b = linear_logprobs_backward(
        hidden, weight, bias, targets, lse, entropy,
        grad_logp if grad_logp is not None else zeros(), grad_lse if grad_lse is not None else zeros(),
        # Autograd hands an output that took no gradient a zero gradient: an entropy that was not
        # computed gets None, so that the backward keeps its fast path (no entropy term).
        grad_entropy if ctx.entropy else None, ignore_index, temperature, softcap, backend, workspace, ctx.sliced,
        fp32_weight_grad, needs,
    )
    keep = lambda grad, needed: grad if needed else None  # noqa: E731
    return (keep(grad_h, needs[0]), keep(grad_w, needs[1]), keep(grad_b, needs[2]),
            None, None, None, None, None, None, None, None)


linear_logprobs_forward.register_autograd(_backward, setup_context=_setup_context)

# What each registered op runs, for tools (like the allocation test) that need to see inside.
IMPLEMENTATIONS = {
    "prefops::linear_logprobs": _forward_impl,
    "prefops::linear_logprobs_backward": _backward_impl,
}


EXTRAS = ("entropy", "sum_p2", "mean_logit")


def token_outputs(hidden, weight, targets, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                  extras=EXTRAS, backend=None, strategy=None, vocab_group=None):
    """Every per-token output of the fused pass, shaped like targets: (logp, lse, entropy,
    sum_p2, mean_logit, top1); see linear_logprobs. logp, lse and entropy are differentiable;
    sum_p2, mean_logit (sum_v z_v / V) and top1 (bool: target's logit >= every logit, so a
    tie counts) are not. All are 0 / False at ignored tokens.

    extras: which of EXTRAS to compute; one left out costs nothing and comes back as None
    (logp, lse and top1 are always there).
    strategy: as in prefops.settings; lean runs the fused kernels, any other the sliced path
    (prefops.strategy).
    vocab_group: see linear_logprobs."""
    shard = vocab_parallel.shard_of(weight, bias, vocab_group)
    if shard is not None:
        hidden, targets = vocab_parallel.local_replicated(hidden, "hidden"), \
            vocab_parallel.local_replicated(targets, "targets")
        weight, bias = shard.weight, shard.bias
    check_linear_inputs(hidden, weight, targets, bias, ignore_index=ignore_index,
                        temperature=temperature, softcap=softcap)
    for name in extras:
        check_choice(name, EXTRAS, "extras entry")
    wanted = [name in extras for name in EXTRAS]
    settings = get_settings()
    backend = check_choice(backend or settings.backend, BACKENDS, "backend")
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden_2d.stride(-1) != 1:
        hidden_2d = hidden_2d.contiguous()
    sliced, workspace = strategy_module.token_path(strategy)
    softcap = None if softcap is None else float(softcap)
    if shard is None:
        outputs = linear_logprobs_forward(hidden_2d, weight.contiguous(), bias, targets.reshape(-1), ignore_index,
                                          float(temperature), softcap, backend, workspace, sliced, wanted)
    else:
        outputs = vocab_parallel.token_outputs(
            hidden_2d, shard, targets.reshape(-1), ignore_index=ignore_index, temperature=float(temperature),
            softcap=softcap, backend=fused.resolve_backend(backend, hidden.device), workspace=workspace,
            sliced=sliced, extras=wanted, fp32_weight_grad=settings.fp32_weight_grad)
    strategy_module.record("sliced" if sliced else "lean")
    present = (True, True, *wanted, True)
    return tuple(value.view(targets.shape) if keep else None for value, keep in zip(outputs, present))


def linear_logprobs(hidden, weight, targets, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                    return_lse=False, return_entropy=False, return_sum_p2=False, backend=None, strategy=None,
                    vocab_group=None):
    """Per-token log p(target | hidden) through the lm_head, without the N x V logits.

    Args:
        hidden: [..., H] final hidden states (bf16, fp16 or fp32).
        weight: [V, H] lm_head weight, same dtype and device.
        targets: [...] integer token ids; ignore_index marks prompt and padding tokens,
            which never reach the vocabulary GEMMs.
        bias: optional [V].
        temperature, softcap: z = softcap * tanh((h W^T + b) / temperature / softcap).
        return_lse, return_entropy, return_sum_p2: also return per-token logsumexp,
            full-vocabulary entropy (nats) and sum_v p_v^2 from the same pass.
        backend: 'auto' (Triton on CUDA, chunked PyTorch on CPU), 'triton' or 'torch';
            default from prefops.configure().
        strategy: 'lean' (fused Triton kernels, least memory) or any other strategy (cuBLAS
            vocabulary slices within the workspace, the default); see prefops.strategy.
        vocab_group: a torch.distributed ProcessGroup over which weight (and bias) are sharded
            along the vocabulary: weight is this rank's rows, in rank order (odd splits allowed),
            and hidden and targets (global ids) are the same on every rank. A DTensor weight with
            a Shard(0) placement is sharded over its mesh dimension without this argument. Every
            rank gets the whole vocabulary's outputs, the full gradient of hidden and its own rows'
            weight gradient (prefops.vocab_parallel); per rank, memory beyond the weights scales
            with its rows.

    Returns fp32 log-probs shaped like targets (0 at ignored tokens), or a LogProbs
    tuple when an extra output is requested. Runs without saving anything for backward
    when no input requires grad (the forward-only path for reference models).
    The mean logit and top-1 of TRL's metrics come from token_outputs (same pass).
    """
    extras = [name for name, wanted in zip(EXTRAS, (return_entropy, return_sum_p2, False)) if wanted]
    logp, lse, entropy, sum_p2, _, _ = token_outputs(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                                     temperature=temperature, softcap=softcap, extras=extras,
                                                     backend=backend, strategy=strategy, vocab_group=vocab_group)
    if not (return_lse or return_entropy or return_sum_p2):
        return logp
    return LogProbs(logp, lse if return_lse else None, entropy if return_entropy else None,
                    sum_p2.detach() if return_sum_p2 else None)
