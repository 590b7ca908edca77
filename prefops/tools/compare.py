"""`prefops compare`: every fused op and loss against its float64 reference, on fresh random inputs.

Each registry entry makes float64 inputs (odd shapes: V, H not multiples of any
block; logits with std 4-8), runs the fused path on them cast to the chosen
dtype, and the reference path (materialised logits, float64) on the same
rounded values. Values and gradients are compared by relative error
||fused - ref|| / ||ref|| (NaN counts as infinite) against the entry's
tolerances (VALUE_TOLERANCE and GRAD_TOLERANCE of the dtype, unless the entry
states its own). An entry
that asks for a strategy must run the one it expects: which one ran is read
from the autograd graph of its outputs (the budget strategy's chunk loop, or
the lean fused op), so a silent fallback fails. The report gives, per entry,
the strategy that ran, the tolerance it was held to and the warnings it raised
(as notes), and ends with what was checked; any failure makes it exit 1.

Families: op (linear_logprobs), objective (sequence_objective), pairwise
(PreferenceLoss, every type in prefops.losses.LOSSES and some combinations),
unpaired (KTO, BCO through sequence_objective), listwise (ListwiseLoss),
token_kl (linear_token_kl), diffusion; lean and budget where both exist.

Adding a family, or a variant, is one Entry in `entries()`:
    Entry("family/variant/strategy", make=..., fused=..., reference=..., strategy="lean" or "budget")
make(generator) returns the float64 inputs as a dict; fused(**inputs) and
reference(**inputs) return dicts of the same named outputs, the fused one
computed from `leaves` (and `cast`) rounded to the dtype, the reference one
from float64 copies of the rounded values. Gradients of every differentiable
fused output (weighted by fixed random upstream values) with respect to
`leaves` are compared too. listwise_entry and token_kl_entry are short examples.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
import zlib
from typing import Callable

import torch

from ..config import STRATEGIES
from ..chunks import budget_bytes_per_logit

# The error model of tests/conftest.py: values are computed with fp32 accumulation from inputs of
# any dtype, so they match float64 of the same rounded inputs to ~1e-5 at these shapes, bf16 or
# not. Gradients are stored in the input dtype: the gradient tile and the result are each rounded
# once, 2u (u = 2^-8 for bf16, 2^-11 for fp16); Triton's CPU interpreter truncates bf16 casts
# instead of rounding them, hence 3u.
VALUE_TOLERANCE = 1e-5
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3 * 2.0**-8, torch.float16: 3 * 2.0**-11}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Odd shapes: nothing is a multiple of a block size.
PAIRS, LENGTH, HIDDEN, VOCAB = 3, 13, 37, 611
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    make: Callable[[torch.Generator], dict]
    fused: Callable[..., dict]
    reference: Callable[..., dict]
    leaves: tuple = ("hidden", "weight")
    cast: tuple = ()  # other inputs rounded to the dtype without a gradient (a reference model's hidden states)
    # dtype -> tolerance of values and gradients, where the error model's cannot hold
    tolerance: dict = dataclasses.field(default_factory=dict)
    strategy: str | None = None  # the strategy asked for (config.STRATEGIES); None where there is no choice
    falls_back: str = ""  # why a budget entry must run lean instead (and warn), when it must

    @property
    def expected(self) -> tuple | None:
        """The paths (prefops.strategy.PATHS) that may run."""
        return ("lean",) if self.falls_back else self.strategy_paths

    @property
    def strategy_paths(self) -> tuple | None:
        """The paths the strategy picks from where nothing forces a fallback."""
        if self.strategy is None:
            return None
        return {"budget": ("stored", "chunked"), "auto": ("stored", "chunked", "sliced")}.get(
            self.strategy, (self.strategy,))


@dataclasses.dataclass(frozen=True)
class Result:
    name: str
    value_error: float
    grad_error: float
    worst: str  # the output or gradient with the largest error
    seconds: float
    error: str = ""  # an exception's message, when the entry could not run
    ran: str = ""  # the paths that computed the fused outputs ('stored', 'lean', 'chunked+lean', ...; '' none)


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere gives inf; 0 when both are 0."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if torch.isnan(actual).any() or torch.isnan(expected).any():
        return float("inf")
    diff = (actual - expected).norm()
    if float(diff) == 0.0:
        return 0.0
    return float(diff / expected.norm().clamp_min(1e-30))


# ---------------------------------------------------------------- the harness

def strategies_that_ran(outputs: dict) -> str:
    """The paths in the autograd graph of the outputs, joined by '+' ('' when none is there): the
    3-GEMM chunk loop is one autograd Function (stored or chunked), lean and sliced are a fused
    op's backward (the sliced flag on its context; the token KL op has lean alone)."""
    from ..chunks import _BudgetObjective
    from ..ops import IMPLEMENTATIONS
    # torch names the backward node of a custom op after the op (torch._library.autograd).
    lean_nodes = tuple(f"GeneratedBackwardFor_{op.replace('::', '_')}_" for op in IMPLEMENTATIONS)
    found, seen = set(), set()
    stack = [value.grad_fn for value in outputs.values() if isinstance(value, torch.Tensor)]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "_forward_cls", None) is _BudgetObjective:
            found.add("stored" if node.stored else "chunked")
        elif node.name().startswith(lean_nodes):
            found.add("sliced" if getattr(node, "sliced", False) else "lean")
        stack += [parent for parent, _ in node.next_functions]
    return "+".join(sorted(found))


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _run_side(fn, inputs, leaves, generator=None, upstream=None, differentiable=None):
    """Outputs, the names of the differentiable ones, the upstream weights and the leaves' gradients of
    sum(output * upstream) over them; upstream is drawn from `generator` when not given. The reference
    side takes `differentiable` from the fused side: an output the fused op detaches (a statistic) has
    no gradient to compare."""
    outputs = fn(**inputs)
    if differentiable is None:
        differentiable = [name for name, value in outputs.items() if value.requires_grad]
    if upstream is None:
        upstream = {name: torch.randn(value.shape, generator=generator, dtype=torch.float64).to(value.device)
                    for name, value in outputs.items()}
    grads = {}
    if differentiable:
        total = sum((outputs[name].double() * upstream[name]).sum() for name in differentiable)
        grads = dict(zip(leaves, torch.autograd.grad(total, [inputs[name] for name in leaves], allow_unused=True)))
    return outputs, differentiable, upstream, grads


def check(entry: Entry, *, dtype, device, seed=0, backend="auto") -> Result:
    """Fused (leaves in `dtype`) against reference (float64) for one entry."""
    from ..config import settings
    begin = time.perf_counter()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(entry.name.encode()))
    made = _to(entry.make(generator), device)
    leaves = tuple(name for name in entry.leaves if made.get(name) is not None)
    fused_inputs, reference_inputs = dict(made), dict(made)
    for name in leaves + entry.cast:
        rounded = made[name].to(dtype).detach()
        fused_inputs[name] = rounded.requires_grad_(name in leaves)
        reference_inputs[name] = rounded.double().requires_grad_(name in leaves)
    with settings(backend=backend):
        fused, differentiable, upstream, fused_grads = _run_side(entry.fused, fused_inputs, leaves, generator)
    ran = strategies_that_ran(fused)
    expected, _, _, expected_grads = _run_side(entry.reference, reference_inputs, leaves, upstream=upstream,
                                               differentiable=differentiable)
    errors = {name: relative_error(fused[name], expected[name]) for name in expected}
    if differentiable:
        for name in leaves:
            got, want = fused_grads[name], expected_grads[name]
            if want is None:
                want = torch.zeros_like(reference_inputs[name])
            errors[f"d{name}"] = (float("inf") if got is None and bool(want.any()) else
                                  relative_error(torch.zeros_like(want) if got is None else got, want))
    value_errors = [e for name, e in errors.items() if name in expected]
    grad_errors = [e for name, e in errors.items() if name not in expected]
    worst = max(errors.items(), key=lambda item: item[1], default=("", 0.0))[0]
    return Result(entry.name, max(value_errors, default=0.0), max(grad_errors, default=0.0), worst,
                  time.perf_counter() - begin, ran=ran)


def _budget(rows: int, hidden, sides: int = 1) -> int:
    """A budget that holds `rows` rows of logits (and their gradient tile) for inputs like `hidden`."""
    return rows * VOCAB * budget_bytes_per_logit(hidden.dtype, sides)


# ---------------------------------------------------------------- inputs

def token_batch(generator, sequences, *, scale=4.0, bias=False):
    """float64 hidden [S, T, H], weight [V, H] (logit std `scale`), targets [S, T] with a 2-token prompt and
    0-3 padding tokens ignored per row, optional bias [V]."""
    hidden = torch.randn(sequences, LENGTH, HIDDEN, generator=generator, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator, dtype=torch.float64) * scale / HIDDEN**0.5
    targets = torch.randint(0, VOCAB, (sequences, LENGTH), generator=generator)
    targets[:, :2] = IGNORE_INDEX
    for row in range(sequences):
        padding = int(torch.randint(0, 4, (), generator=generator))
        if padding:
            targets[row, -padding:] = IGNORE_INDEX
    out = {"hidden": hidden, "weight": weight, "targets": targets}
    if bias:
        out["bias"] = torch.randn(VOCAB, generator=generator, dtype=torch.float64)
    return out


def reference_token_logps(hidden, weight, targets, **options):
    from ..reference import linear_logprobs
    return linear_logprobs(hidden, weight, targets, **options)


# ---------------------------------------------------------------- the core op

OP_OPTIONS = dict(temperature=0.7, softcap=15.0)


def _op_entries():
    from ..ops import linear_logprobs
    from ..reference import token_sum_p2

    def make_plain(generator):
        batch = token_batch(generator, 5)
        return {**batch, "hidden": batch["hidden"].reshape(-1, HIDDEN), "targets": batch["targets"].reshape(-1)}

    def make_full(generator):
        return {**make_plain(generator), "weight": token_batch(generator, 1, scale=8.0)["weight"],
                "bias": torch.randn(VOCAB, generator=generator, dtype=torch.float64)}

    def fused_full(hidden, weight, targets, bias):
        out = linear_logprobs(hidden, weight, targets, bias=bias, return_lse=True, return_entropy=True,
                              return_sum_p2=True, **OP_OPTIONS)
        return {"logp": out.logp, "lse": out.lse, "entropy": out.entropy, "sum_p2": out.sum_p2}

    def reference_full(hidden, weight, targets, bias):
        logp, lse, entropy = reference_token_logps(hidden, weight, targets, bias=bias, return_lse=True,
                                                   return_entropy=True, **OP_OPTIONS)
        sum_p2 = token_sum_p2(hidden, weight, targets, bias=bias, **OP_OPTIONS)
        return {"logp": logp, "lse": lse, "entropy": entropy, "sum_p2": sum_p2}

    return [
        Entry("op/linear_logprobs", make_plain,
              lambda hidden, weight, targets: {"logp": linear_logprobs(hidden, weight, targets)},
              lambda hidden, weight, targets: {"logp": reference_token_logps(hidden, weight, targets)}),
        Entry("op/linear_logprobs+bias+softcap+temperature+lse+entropy+sum_p2", make_full, fused_full,
              reference_full, leaves=("hidden", "weight", "bias")),
    ]


# ---------------------------------------------------------------- sequence_objective

def _objective_entries():
    from ..objective import sequence_objective
    from ..reference import token_sum_p2

    sequences = 7
    groups = torch.tensor([[0, 3, 5], [1, 4, -1], [6, 2, -1]])

    def make(generator):
        batch = token_batch(generator, sequences)
        # Packed tokens: sequence ids shuffled, a few tokens belong to no sequence (-1).
        seq_ids = torch.arange(sequences).repeat_interleave(LENGTH)
        seq_ids = seq_ids[torch.randperm(seq_ids.numel(), generator=generator)]
        seq_ids[::17] = -1
        token_weights = torch.rand(sequences * LENGTH, generator=generator, dtype=torch.float64) + 0.5
        return {"hidden": batch["hidden"].reshape(-1, HIDDEN), "weight": batch["weight"],
                "targets": batch["targets"].reshape(-1), "seq_ids": seq_ids, "token_weights": token_weights}

    def head(logps, present, stats):
        """Additive over groups, nonlinear in each: softmax cross-entropy of slot 0 among the present slots."""
        scores = torch.where(present, 0.05 * logps - 0.01 * stats["entropy"] + 0.02 * stats["log_sum_p2"],
                             -float("inf"))
        return (torch.logsumexp(scores, dim=1) - scores[:, 0]).sum()

    def fused(strategy):
        def run(hidden, weight, targets, seq_ids, token_weights):
            rows = groups.to(targets.device)
            out = sequence_objective(
                hidden, weight, targets, head=lambda logps, index, stats: head(logps, rows[index] >= 0, stats),
                groups=rows, seq_ids=seq_ids, token_weights=token_weights.float(),
                stats=("entropy", "log_sum_p2"), strategy=strategy, budget=_budget(3 * LENGTH, hidden))
            return {"loss": out.loss, "logps": out.logps}
        return run

    def reference(hidden, weight, targets, seq_ids, token_weights):
        logp, _, entropy = reference_token_logps(hidden, weight, targets, return_entropy=True)
        sum_p2 = token_sum_p2(hidden, weight, targets)
        counted = (targets != IGNORE_INDEX) & (seq_ids >= 0)
        one_hot = torch.nn.functional.one_hot(seq_ids.clamp_min(0), sequences).double() * counted[:, None]
        logps = (logp * token_weights) @ one_hot
        stats = {"entropy": (entropy * counted).detach() @ one_hot,
                 "log_sum_p2": torch.where(counted, sum_p2.clamp_min(1e-300).log(), 0.0).detach() @ one_hot}
        rows = groups.to(targets.device)
        pick = lambda values: torch.where(rows >= 0, values[rows.clamp_min(0)], 0.0)  # noqa: E731
        present = groups.to(targets.device) >= 0
        return {"loss": head(pick(logps), present, {k: pick(v) for k, v in stats.items()}), "logps": logps}

    return [Entry(f"objective/{strategy}", make, fused(strategy), reference, strategy=strategy)
            for strategy in STRATEGIES]


# ---------------------------------------------------------------- pairwise (PreferenceLoss)

PAIRWISE_BETA = 0.2


def pairwise_params(loss_type, generator):
    """The options a loss type needs to run (and that make it differ from its defaults)."""
    if loss_type == "sppo":
        return {"preference_probs": torch.rand(PAIRS, generator=generator)}
    if loss_type == "modpo":
        return {"chosen_margin_rewards": torch.randn(PAIRS, 2, generator=generator),
                "rejected_margin_rewards": torch.randn(PAIRS, 2, generator=generator),
                "modpo_weights": [0.6, 0.3, 0.1]}
    if loss_type in ("exo_pair", "robust"):
        return {"label_smoothing": 0.2}
    return {}


def pairwise_reference_loss(hidden, weight, targets, ref, *, loss_type, beta=0.1, ld_alpha=None, wpo=False,
                            **params):
    """float64 pipeline: materialised logits -> per-sequence (weighted) sums -> the same pairwise_loss."""
    from ..losses import ld_dpo_token_weights, pairwise_loss
    from ..reference import token_sum_p2
    pairs = targets.shape[0] // 2  # [chosen; rejected]
    token = reference_token_logps(hidden, weight, targets)
    counted = targets != IGNORE_INDEX
    weights = counted.double()
    if ld_alpha is not None:
        weights = torch.cat(ld_dpo_token_weights(counted[:pairs], counted[pairs:], ld_alpha)).double()
    sums = (token * weights).sum(1)
    lengths = counted.sum(1).double()
    if wpo:
        log_sum_p2 = torch.where(counted, token_sum_p2(hidden, weight, targets).clamp_min(1e-300).log(), 0.0).sum(1)
        plain_sums = torch.where(counted, token, 0.0).sum(1)  # WPO ignores the LD weights, as TRL
        per_sequence = ((plain_sums.detach() - log_sum_p2) / lengths).exp()
        params["pair_weights"] = per_sequence[:pairs] * per_sequence[pairs:]
    losses, metrics = pairwise_loss(sums[:pairs], sums[pairs:], ref[:pairs], ref[pairs:], loss_type=loss_type,
                                    beta=beta, chosen_lengths=lengths[:pairs], rejected_lengths=lengths[pairs:],
                                    **params)
    return losses.mean(), metrics


PAIRWISE_OUTPUTS = ("logps/chosen", "logps/rejected", "rewards/chosen")


def pairwise_entry(name, strategy, loss_type, **options):
    """PreferenceLoss(loss_type, **options) under `strategy` against the float64 pipeline.

    The budget holds two pairs' logits, so with three pairs the head runs on two chunks."""
    from ..preference import BATCH_COUPLED_LOSSES, PreferenceLoss

    names = [loss_type] if isinstance(loss_type, str) else loss_type
    coupled = strategy == "budget" and any(name in BATCH_COUPLED_LOSSES for name in names)

    def make(generator):
        batch = token_batch(generator, 2 * PAIRS)
        return {**batch, "ref": torch.randn(2 * PAIRS, generator=generator, dtype=torch.float64) - 40,
                "params": {**options, **pairwise_params(loss_type if isinstance(loss_type, str) else "", generator)}}

    def fused(hidden, weight, targets, ref, params):
        module = PreferenceLoss(loss_type, beta=PAIRWISE_BETA, strategy=strategy,
                                budget=_budget(2 * 2 * LENGTH, hidden), **params)
        loss, metrics = module(hidden, weight, targets, ref_chosen_logps=ref[:PAIRS].float(),
                               ref_rejected_logps=ref[PAIRS:].float())
        return {"loss": loss, **{k: metrics[k] for k in PAIRWISE_OUTPUTS}}

    def reference(hidden, weight, targets, ref, params):
        loss, metrics = pairwise_reference_loss(hidden, weight, targets, ref.float().double(), loss_type=loss_type,
                                            beta=PAIRWISE_BETA, **params)
        return {"loss": loss, **{k: metrics[k] for k in PAIRWISE_OUTPUTS}}

    return Entry(f"pairwise/{name}/{strategy}", make, fused, reference, strategy=strategy,
                 falls_back="the loss couples the pairs of a batch (AOT sorts across it)" if coupled else "")


def _pairwise_entries():
    from ..losses import LOSSES
    variants = [(loss_type, loss_type, {}) for loss_type in sorted(LOSSES)] + [
        ("sigmoid+sft", ["sigmoid", "sft"], {"loss_weights": [1.0, 0.5]}),
        ("sigmoid+bco_pair+ipo", ["sigmoid", "bco_pair", "ipo"], {"loss_weights": [0.5, 1.0, 0.1]}),
        ("sigmoid+label_smoothing", "sigmoid", {"label_smoothing": 0.1}),
        ("sigmoid+js_divergence", "sigmoid", {"f_divergence_type": "js_divergence"}),
        ("sigmoid+ld_alpha", "sigmoid", {"ld_alpha": 0.5}),
        ("sigmoid+wpo", "sigmoid", {"wpo": True}),
        ("sigmoid+wpo+ld_alpha", "sigmoid", {"wpo": True, "ld_alpha": 0.5}),
    ]
    return [pairwise_entry(name, strategy, loss_type, **options)
            for name, loss_type, options in variants for strategy in STRATEGIES]


# ---------------------------------------------------------------- unpaired (KTO, BCO) through sequence_objective

UNPAIRED = 5


def unpaired_entry(name, strategy, make_loss):
    """make_loss() -> fn(policy_logps, ref_logps, labels) -> (losses, metrics); run per completion
    (groups [N, 1]) through sequence_objective, against float64 sums."""
    from ..objective import sequence_objective

    def make(generator):
        batch = token_batch(generator, UNPAIRED)
        labels = torch.rand(UNPAIRED, generator=generator) < 0.5
        labels[0], labels[1] = True, False
        # The reference near the policy, as at the start of training: the losses are not saturated.
        policy = reference_token_logps(batch["hidden"], batch["weight"], batch["targets"]).sum(1)
        return {**batch, "ref": policy + 2 * torch.randn(UNPAIRED, generator=generator, dtype=torch.float64),
                "labels": labels}

    def fused(hidden, weight, targets, ref, labels):
        loss_fn, ref32 = make_loss(), ref.float()
        groups = torch.arange(UNPAIRED, device=targets.device)[:, None]

        def head(logps, group_index, stats):
            return loss_fn(logps[:, 0], ref32[group_index], labels[group_index])[0].sum() / UNPAIRED

        out = sequence_objective(hidden, weight, targets, head=head, groups=groups, strategy=strategy,
                                 budget=_budget(2 * LENGTH, hidden))
        return {"loss": out.loss, "logps": out.logps}

    def reference(hidden, weight, targets, ref, labels):
        logps = reference_token_logps(hidden, weight, targets).sum(1)
        return {"loss": make_loss()(logps, ref.float().double(), labels)[0].mean(), "logps": logps}

    return Entry(f"unpaired/{name}/{strategy}", make, fused, reference, strategy=strategy)


def _unpaired_entries():
    from ..losses import BCOLoss, kto_loss

    def bco():
        module = BCOLoss(beta=0.3).eval()  # eval: the running reward mean is frozen, so every chunk sees it
        module.delta.fill_(0.25)
        return module

    makers = {
        "kto": lambda: lambda p, r, l: kto_loss(p, r, l, beta=0.3, kl=0.4, desirable_weight=1.3,
                                                undesirable_weight=0.7),
        "apo_zero_unpaired": lambda: lambda p, r, l: kto_loss(p, r, l, beta=0.3, loss_type="apo_zero_unpaired"),
        "bco": bco,
    }
    return [unpaired_entry(name, strategy, maker) for name, maker in makers.items() for strategy in STRATEGIES]


# ---------------------------------------------------------------- listwise (ListwiseLoss)

LISTS, LIST_SIZE = 2, 3


def listwise_entry(loss_type, strategy):
    """ListwiseLoss(loss_type) under `strategy` (list-major padded batch, scores) against float64 sums;
    the budget holds one list's logits, so each list is its own chunk."""
    from ..listwise import ListwiseLoss
    from ..losses.listwise import listwise_loss

    def make(generator):
        batch = token_batch(generator, LISTS * LIST_SIZE)
        return {**batch, "ref": torch.randn(LISTS * LIST_SIZE, generator=generator, dtype=torch.float64) - 40,
                "scores": torch.randn(LISTS, LIST_SIZE, generator=generator)}

    def fused(hidden, weight, targets, ref, scores):
        module = ListwiseLoss(loss_type, beta=PAIRWISE_BETA, strategy=strategy,
                              budget=_budget(LIST_SIZE * LENGTH, hidden))
        loss, _ = module(hidden, weight, targets, scores=scores, ref_logps=ref.float())
        return {"loss": loss}

    def reference(hidden, weight, targets, ref, scores):
        lists = torch.arange(LISTS * LIST_SIZE, device=targets.device).view(LISTS, LIST_SIZE)
        sums = reference_token_logps(hidden, weight, targets).sum(1)
        lengths = (targets != IGNORE_INDEX).sum(1).double()
        losses, _ = listwise_loss(sums[lists], ref.float().double()[lists], scores=scores, loss_type=loss_type,
                                  beta=PAIRWISE_BETA, lengths=lengths[lists])
        return {"loss": losses.mean()}

    return Entry(f"listwise/{loss_type}/{strategy}", make, fused, reference, strategy=strategy)


def _listwise_entries():
    from ..losses.listwise import LISTWISE_LOSSES
    return [listwise_entry(loss_type, strategy) for loss_type in sorted(LISTWISE_LOSSES)
            for strategy in STRATEGIES]


# ---------------------------------------------------------------- token-level KL (linear_token_kl)

def token_kl_entry(direction):
    """linear_token_kl with targets (KL, log p, log p_ref from one pass) against the float64 reference."""
    from ..reference import token_kl as reference_kl
    from ..token_kl import linear_token_kl

    def make(generator):
        policy, reference = token_batch(generator, 4), token_batch(generator, 4, scale=6.0)
        flat = lambda batch: batch["hidden"].reshape(-1, HIDDEN)  # noqa: E731
        return {"hidden": flat(policy), "weight": policy["weight"], "ref_hidden": flat(reference),
                "ref_weight": reference["weight"], "targets": policy["targets"].reshape(-1)}

    def run(fn):
        def outputs(hidden, weight, ref_hidden, ref_weight, targets):
            kl, logp, ref_logp = fn(hidden, weight, ref_hidden, ref_weight, targets=targets, direction=direction,
                                    mask=targets != IGNORE_INDEX, **OP_OPTIONS)
            return {"kl": kl, "logp": logp, "ref_logp": ref_logp}
        return outputs

    return Entry(f"token_kl/{direction}", make, run(linear_token_kl), run(reference_kl.linear_token_kl),
                 cast=("ref_hidden", "ref_weight"))


def tdpo_entry(loss_type, direction, strategy):
    """PreferenceLoss(tdpo1 | tdpo2) from policy and reference hidden states against the float64 pipeline:
    materialised logits -> per-token KL and log-probs -> sequence sums -> the same pairwise_loss."""
    from ..losses import pairwise_loss
    from ..preference import PreferenceLoss
    from ..reference import token_kl as reference_kl

    def make(generator):
        # The policy near its reference, as in training: sequence KLs of a few nats, not hundreds,
        # whose fp32 rounding would swamp the loss they are subtracted in.
        policy, noise = token_batch(generator, 2 * PAIRS), token_batch(generator, 2 * PAIRS, scale=1.0)
        return {**policy, "ref_hidden": policy["hidden"] + 0.3 * noise["hidden"],
                "ref_weight": policy["weight"] + 0.3 * noise["weight"]}

    def fused(hidden, weight, targets, ref_hidden, ref_weight):
        module = PreferenceLoss(loss_type, beta=PAIRWISE_BETA, kl_direction=direction, strategy=strategy,
                                budget=_budget(2 * 2 * LENGTH, hidden, sides=2))
        loss, metrics = module(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=ref_weight)
        return {"loss": loss, **{k: metrics[k] for k in PAIRWISE_OUTPUTS}}

    def reference(hidden, weight, targets, ref_hidden, ref_weight):
        kl, logp, ref_logp = reference_kl.linear_token_kl(hidden, weight, ref_hidden, ref_weight, targets=targets,
                                                          direction=direction)
        counted = targets != IGNORE_INDEX
        sums = [torch.where(counted, x, 0.0).sum(1) for x in (logp, ref_logp, kl)]
        (chosen, rejected), (ref_chosen, ref_rejected), (kl_chosen, kl_rejected) = (
            (x[:PAIRS], x[PAIRS:]) for x in sums)
        lengths = counted.sum(1).double()
        losses, metrics = pairwise_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type=loss_type,
                                        beta=PAIRWISE_BETA, chosen_lengths=lengths[:PAIRS],
                                        rejected_lengths=lengths[PAIRS:], chosen_seq_kl=kl_chosen,
                                        rejected_seq_kl=kl_rejected)
        return {"loss": losses.mean(), **{k: metrics[k] for k in PAIRWISE_OUTPUTS}}

    return Entry(f"tdpo/{loss_type}/{direction}/{strategy}", make, fused, reference, cast=("ref_hidden", "ref_weight"),
                 strategy=strategy)


def _token_kl_entries():
    return [token_kl_entry(direction) for direction in ("ref_policy", "policy_ref")] + [
        tdpo_entry(loss_type, direction, strategy) for loss_type in ("tdpo1", "tdpo2")
        for direction in ("ref_policy", "policy_ref") for strategy in STRATEGIES]


# ---------------------------------------------------------------- diffusion

def _diffusion_entries():
    from ..losses import diffusion_dpo_loss, mapo_loss

    def make(generator):
        errors = lambda: 0.1 + 0.01 * torch.rand(5, generator=generator, dtype=torch.float64)  # noqa: E731
        return {"model_err_w": errors(), "model_err_l": errors(), "ref_err_w": errors(), "ref_err_l": errors()}

    def dpo(model_err_w, model_err_l, ref_err_w, ref_err_l):
        # The reference errors are fp32 data on both sides (they are not leaves).
        return {"loss": diffusion_dpo_loss(model_err_w, model_err_l, ref_err_w.float(), ref_err_l.float())[0].mean()}

    def mapo(model_err_w, model_err_l, ref_err_w, ref_err_l):
        return {"loss": mapo_loss(model_err_w, model_err_l, beta=0.1, snr_value=2.0)[0].mean()}

    leaves = ("model_err_w", "model_err_l")
    # MaPO multiplies a difference of two g(c e) ~ 0.9 by T = 1000: an fp32 ulp of g becomes
    # ~6e-5 in the margin, so fp32 gradients carry ~1e-5 relative error whatever the inputs.
    mapo_tolerance = {torch.float32: 1e-4}
    # The same function at the working precision and in float64: these losses have no fused kernel.
    return [Entry("diffusion/diffusion_dpo", make, dpo, dpo, leaves),
            Entry("diffusion/mapo", make, mapo, mapo, leaves, tolerance=mapo_tolerance)]


def entries() -> dict:
    """Every registered comparison, by name (family/variant[/strategy])."""
    found = [*_op_entries(), *_objective_entries(), *_pairwise_entries(), *_unpaired_entries(),
             *_listwise_entries(), *_token_kl_entries(), *_diffusion_entries()]
    return {entry.name: entry for entry in found}


def select(all_entries: dict, only: str | None) -> list:
    """Entries named in `only` (comma-separated names or name prefixes ending at a '/'), all when None."""
    if not only:
        return list(all_entries.values())
    chosen = []
    for token in (t.strip().rstrip("/") for t in only.split(",") if t.strip()):
        matched = [e for n, e in all_entries.items() if n == token or n.startswith(token + "/")]
        if not matched:
            families = sorted({n.split("/")[0] for n in all_entries})
            raise ValueError(f"--only: no entry named {token!r}; families: {', '.join(families)} "
                             "(prefops compare --list shows every name)")
        chosen += [e for e in matched if e not in chosen]
    return chosen


# ---------------------------------------------------------------- `prefops compare`

@dataclasses.dataclass
class Row:
    """One entry's line of the report."""
    entry: Entry
    result: Result
    tolerance: tuple  # (values, gradients)
    notes: list  # warnings the entry raised, as "Category: message"

    @property
    def problems(self) -> list:
        found = []
        if self.result.error:
            found.append("error")
        elif not (self.result.value_error <= self.tolerance[0] and self.result.grad_error <= self.tolerance[1]):
            found.append("over tolerance")
        expected = self.entry.expected
        ran = set(filter(None, self.result.ran.split("+")))
        if not self.result.error and expected and not (ran and ran <= set(expected)):
            found.append(f"ran {self.result.ran or 'no strategy'}, not {' or '.join(expected)}")
        return found


def _run_entry(entry, *, dtype, device, seed, backend) -> Row:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, each time: one entry's must not hide another's
        try:
            result = check(entry, dtype=dtype, device=device, seed=seed, backend=backend)
        except Exception as error:  # noqa: BLE001 - an entry that cannot run is a failure in the table
            first_line = (str(error).strip().splitlines() or [""])[0]
            result = Result(entry.name, float("inf"), float("inf"), "", 0.0,
                            f"{type(error).__name__}: {first_line[:120]}")
    notes = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    own = entry.tolerance.get(dtype)
    return Row(entry, result, (own, own) if own else (VALUE_TOLERANCE, GRAD_TOLERANCE[dtype]), notes)


def report(rows: list, header: str) -> tuple[str, bool]:
    """The markdown report of the rows (table, numbered notes, what was checked) and whether all passed."""
    note_numbers = {}
    for row in rows:
        for note in row.notes:
            note_numbers.setdefault(note, len(note_numbers) + 1)
    table = []
    for row in rows:
        result, entry = row.result, row.entry
        ran = (result.ran or "none") if entry.expected else "—"
        if entry.expected and not set(filter(None, result.ran.split("+"))) <= set(entry.strategy_paths):
            ran += f" ({entry.strategy} asked)"
        table.append([result.name, ran, f"{result.value_error:.1e}", f"{result.grad_error:.1e}",
                      "{:.1e} / {:.1e}".format(*row.tolerance),
                      "; ".join(["FAIL"] + row.problems) if row.problems else "ok",
                      result.error or result.worst, " ".join(f"[{note_numbers[n]}]" for n in row.notes),
                      f"{result.seconds:.2f}"])
    from .bench import markdown_table
    lines = [header, "", markdown_table(["entry", "strategy ran", "max rel err values", "max rel err grads",
                                         "tolerance values / grads", "status", "worst", "notes", "s"], table)]
    if note_numbers:
        lines += ["", "Notes (warnings raised while the entries ran):"]
        lines += [f"[{number}] {note}" for note, number in note_numbers.items()]
    by_tolerance = {}
    for row in rows:
        by_tolerance.setdefault(row.tolerance, []).append(row.entry.name)
    held = " and ".join(f"{values:g} on values, {grads:.2g} on gradients "
                        f"({', '.join(names) if len(names) <= 3 else _entries(len(names))})"
                        for (values, grads), names in sorted(by_tolerance.items()))
    with_strategy = [row for row in rows if row.entry.expected]
    fallbacks = [f"{row.entry.name}, as {row.entry.falls_back}" for row in with_strategy if row.entry.falls_back]
    checked = (f"Checked: the values and gradients of {_entries(len(rows))} against float64, by max relative "
               f"error, at {held}.")
    if with_strategy:
        checked += f" And the strategy that ran, where an entry chooses one ({_entries(len(with_strategy))})"
        checked += f"; lean where budget is asked: {'; '.join(fallbacks)}." if fallbacks else "."
    failed = [row for row in rows if row.problems]
    verdict = (f"FAILED: {len(failed)} of {_entries(len(rows))}: "
               + ", ".join(f"{row.entry.name} ({'; '.join(row.problems)})" for row in failed)
               if failed else f"passed: all {_entries(len(rows))}")
    lines += ["", checked, verdict]
    return "\n".join(lines), not failed


def _entries(count):
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def run_compare(args: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        raise ValueError(f"unrecognised arguments: {' '.join(rest)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU found; use --device cpu")
    if args.backend == "triton" and device.type == "cpu" and "prefops.kernels" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, on first use
    all_entries = entries()
    if args.list:
        print("\n".join(all_entries))
        return 0
    chosen = select(all_entries, args.only)
    dtype = DTYPES[args.dtype]
    header = (f"prefops compare: {_entries(len(chosen))}, {args.dtype} on {device.type}, backend {args.backend}, "
              f"seed {args.seed}")
    print(f"prefops compare: running {len(chosen)} entries", file=sys.stderr, flush=True)  # they take a while
    rows = [_run_entry(entry, dtype=dtype, device=device, seed=args.seed, backend=args.backend) for entry in chosen]
    text, passed = report(rows, header)
    print(text)
    return 0 if passed else 1
