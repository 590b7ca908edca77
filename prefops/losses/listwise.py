"""Listwise preference losses: K >= 2 responses per prompt, ranked or scored, trained at once.

Inputs are sequence-level, as for the pairwise family: per response the policy
log-prob summed over its tokens (and the reference's), arranged [P, K] (P lists,
K slots; `mask` marks the present responses, so K may vary between lists), or
flat [S] with `list_ids` (packed form). The preference comes as `scores`
(larger = better) or `ranks` (smaller = better, ties allowed).

Notation: ℓ_i, ℓ_ref,i the policy and reference sums of response i, Δ_i = ℓ_i - ℓ_ref,i,
s_i = β Δ_i, ψ_i the label (the score; from ranks, the number of responses ranked
strictly below i), i ≻ j when ψ_i > ψ_j. A list whose responses are all tied has
no ordered pair; the pair-based losses give it 0.

Metrics (detached scalars; implicit reward r_i = β Δ_i, or the loss's own
reference-free reward): rewards/accuracies (fraction of ordered pairs i ≻ j with
r_i > r_j, pooled over the batch), rewards/kendall_tau (Kendall τ-b between r and
ψ, mean over lists that have an ordered pair; a list whose rewards all tie, as at
the first step, counts as τ = 0 rather than NaN), rewards/top1_accuracy
(fraction of lists with an ordered pair whose highest reward is a best response,
strictly above every other), rewards/chosen, rewards/rejected (mean reward of
the best and of the worst responses, mean over lists), rewards/margins (their
difference), rewards/mean, logps/chosen, logps/rejected, logps/mean. At K = 2
these equal the pairwise metrics of the same name.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property

import torch
import torch.nn.functional as F

from ..checks import ValueCheck, run_value_checks
from .pairwise import (REFERENCE_FREE, PairBatch, PairwiseSpec, _MissingInput, _rewards, check_beta, check_in_range,
                       compute_dtype, has_nll_term)

LISTWISE_PARAM_DEFAULTS = {
    "top_k": None,              # plackett_luce: only the first top_k ranking positions
    "target": "hard",           # adpo: 'hard' (uniform on the best responses) or 'soft' (softmax(ψ / T))
    "target_temperature": 1.0,  # T of the soft targets (adpo, list_ce)
    "pairwise_type": "sigmoid",  # all_pairs, dcg_pairwise: a pairwise loss type or a list of them
    "pro_sft_weight": 0.05,     # pro: weight of the SFT term
}
# Scalar options of prefops.losses.pairwise_loss, passed on by all_pairs and dcg_pairwise.
# Its per-pair tensors (preference_probs, pair_weights, MODPO margins) have no meaning per list.
PAIRWISE_OPTIONS = ("label_smoothing", "loss_weights", "discopop_tau", "f_divergence_type",
                    "f_alpha_divergence_coef", "simpo_gamma", "gamma_beta_ratio", "cpo_alpha", "alpha",
                    "dpop_lambda", "nll_mean_length")
# These sort or mix pairs across the whole batch, so they are not a loss per list.
_BATCH_LEVEL_PAIRWISE = ("aot", "aot_unpaired")


def pad_lists(list_ids: torch.Tensor) -> torch.Tensor:
    """Packed list ids [S] -> index [P, K] into the flat responses (-1 marks an empty slot).

    Lists are numbered 0..P-1 by id; responses keep their storage order within a list."""
    if not isinstance(list_ids, torch.Tensor) or list_ids.dim() != 1 or list_ids.dtype.is_floating_point:
        raise ValueError("list_ids must be an integer tensor [S]: the list of every response")
    if list_ids.numel() == 0 or int(list_ids.min()) < 0:
        raise ValueError("list_ids must be non-empty and >= 0")
    lists = int(list_ids.max()) + 1
    sizes = torch.bincount(list_ids, minlength=lists)
    order = torch.argsort(list_ids, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(list_ids.numel(), device=list_ids.device) - starts[list_ids[order]]
    index = torch.full((lists, max(int(sizes.max()), 1)), -1, dtype=torch.long, device=list_ids.device)
    index[list_ids[order], slot] = order
    return index


def _padded(value, name: str, shape, device, index, flat_size):
    """A per-response input as [P, K]: a tensor of the right shape, or ragged Python rows checked one by one."""
    if value is None:
        return None
    if index is not None:  # packed form: [S] values follow list_ids
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (flat_size,):
            raise ValueError(f"{name} must be a tensor [S] = ({flat_size},) like logps in the packed form")
        value = value.to(device)
        return torch.where(index >= 0, value[index.clamp_min(0)], torch.zeros((), dtype=value.dtype,
                                                                              device=value.device))
    if not isinstance(value, torch.Tensor):
        if not isinstance(value, Sequence) or len(value) != shape[0]:
            raise ValueError(f"{name} must be a tensor [P, K] = {tuple(shape)} or P = {shape[0]} rows")
        for row, entries in enumerate(value):
            if len(entries) != shape[1]:
                raise ValueError(f"{name}[{row}] (list {row}) has {len(entries)} entries but lists have K = "
                                 f"{shape[1]} slots: pad every list to K and pass mask (True = present)")
        value = torch.as_tensor(value, device=device)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of logps {tuple(shape)}; got {tuple(value.shape)}")
    return value.to(device)


def _first_bad(bad: torch.Tensor):
    list_index, slot = (int(i) for i in bad.nonzero()[0])
    return list_index, slot


def _finite_check(values, mask, name) -> ValueCheck:
    bad = mask & ~torch.isfinite(values)

    def fail():
        p, k = _first_bad(bad)
        raise ValueError(f"{name} of list {p} is {values[p, k].item()} at response {k}: every present response "
                         "needs a finite value (for padded lists pass mask, True = present)")
    return ValueCheck(bad.any(), fail)


def _check_finite(values, mask, name):
    run_value_checks([_finite_check(values, mask, name)])


def _ranks_labels(ranks: torch.Tensor, mask: torch.Tensor):
    """(ψ, the checks that ranks form a tied ordering): ψ is only meaningful once the checks pass."""
    if ranks.dtype == torch.bool or ranks.dtype.is_complex:
        raise TypeError(f"ranks must be integers or integer-valued floats; got {ranks.dtype}")
    r = ranks.double()
    not_integer = mask & (r != r.round())

    def fail_integer():
        p, k = _first_bad(not_integer)
        raise ValueError(f"ranks of list {p} are not an ordering: {r[p, k].item()} at response {k} is not an "
                         "integer (for arbitrary ordinal values pass scores = -ranks)")

    big = torch.finfo(torch.float64).max
    low = torch.where(mask, r, big).amin(1)
    high = torch.where(mask, r, -big).amax(1)
    start_ok = (low == 0) | (low == 1)
    bad_list = ~start_ok | (high > low + mask.sum(1) - 1)

    def fail_ordering():
        p = int(bad_list.nonzero()[0])
        present = r[p][mask[p]].tolist()
        raise ValueError(f"ranks of list {p} are not a (tied) ordering: {present}; ranks start at 0 or 1 and "
                         "stay below start + (number of responses), e.g. [1, 2, 2, 4] or [0, 1, 1, 2] "
                         "(for arbitrary ordinal values pass scores = -ranks)")

    worse = mask[:, :, None] & mask[:, None, :] & (r[:, :, None] < r[:, None, :])
    checks = [_finite_check(r, mask, "ranks"), ValueCheck(not_integer.any(), fail_integer),
              ValueCheck(bad_list.any(), fail_ordering)]
    return worse.sum(-1).to(torch.float64), checks


def ranks_to_labels(ranks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ψ from ranks: the number of present responses ranked strictly below each one.

    Ranks must form a (tied) ordering of each list: integers starting at 0 or 1, no
    value beyond start + n - 1 for a list of n (dense "1 1 2" or competition "1 1 3")."""
    labels, checks = _ranks_labels(ranks, mask)
    run_value_checks(checks)
    return labels


def preference_matrix(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """better [P, K, K]: response i strictly preferred to response j, both present."""
    both = mask[:, :, None] & mask[:, None, :]
    return both & (labels[:, :, None] > labels[:, None, :])


def _masked_logsumexp(values, keep):
    return torch.logsumexp(torch.where(keep, values, -math.inf), -1)


class ListBatch:
    """Inputs [P, K] in the compute dtype (0 in empty slots), and the values the losses share (cached).

    nll_mean_length: the pair-based types' NLL term's mean chosen length over every ordered pair
    of the whole batch (None where no NLL term reads it), so that the loss stays additive over lists.
    """

    def __init__(self, spec, logps, ref, labels, mask, lengths, from_scores, nll_mean_length=None):
        self.logps, self.ref, self.labels, self.mask, self.lengths = logps, ref, labels, mask, lengths
        self.spec, self.beta, self.params = spec, spec.beta, spec.params
        self.from_scores, self.nll_mean_length = from_scores, nll_mean_length

    def part(self, group_index, logps):
        """The lists group_index (None: all of them) with these policy sums [G', K] (0 in empty slots)."""
        pick = lambda values: values if group_index is None or values is None else values[group_index]  # noqa: E731
        return ListBatch(self.spec, logps.to(self.labels.dtype), pick(self.ref), pick(self.labels), pick(self.mask),
                         pick(self.lengths), self.from_scores, self.nll_mean_length)

    @cached_property
    def better(self):
        return preference_matrix(self.labels, self.mask)

    @cached_property
    def has_worse(self):
        """[P, K]: the response is preferred to at least one other."""
        return self.better.any(-1)

    @cached_property
    def position(self):
        """[P, K]: number of responses strictly better (0 for the best)."""
        return self.better.sum(1)

    @cached_property
    def include_self(self):
        """better with the diagonal: the set a Plackett-Luce choice is made from, for each response."""
        eye = torch.eye(self.mask.shape[1], dtype=torch.bool, device=self.mask.device)
        return self.better | eye

    @cached_property
    def is_best(self):
        return self.mask & (self.labels == torch.where(self.mask, self.labels, -math.inf).amax(1, keepdim=True))

    @cached_property
    def is_worst(self):
        return self.mask & (self.labels == torch.where(self.mask, self.labels, math.inf).amin(1, keepdim=True))

    @cached_property
    def logratios(self):
        if self.ref is None:
            raise _MissingInput("ref_logps")
        return self.logps - self.ref

    @cached_property
    def s(self):
        return self.beta * self.logratios

    @cached_property
    def mean_logps(self):
        if self.lengths is None:
            raise _MissingInput("lengths")
        return self.logps / torch.where(self.mask, self.lengths, 1.0)

    def soft_targets(self):
        """softmax(ψ / T) over the present responses."""
        return torch.softmax(torch.where(self.mask, self.labels / self.params["target_temperature"], -math.inf), -1)

    def hard_targets(self):
        """Uniform over the best responses (one-hot without ties)."""
        best = self.is_best.to(self.logps.dtype)
        return best / best.sum(1, keepdim=True)

    @cached_property
    def lambda_weights(self):
        """LiPO's λ_ij = |G_i - G_j| · |1/D(τ_i) - 1/D(τ_j)| on ordered pairs i ≻ j, 0 elsewhere (no gradient).

        G = 2^ψ - 1, D(τ) = log(1 + τ), τ the 1-based position under the current s. Ties
        in s break toward the ideal order (larger ψ first), so at initialisation, where
        every s is 0, the weights are those of the ideal ranking rather than all 0."""
        s, labels = self.s.detach(), self.labels
        ahead = (s[:, None, :] > s[:, :, None]) | ((s[:, None, :] == s[:, :, None])
                                                  & (labels[:, None, :] > labels[:, :, None]))
        tau = 1 + (ahead & self.mask[:, None, :]).sum(-1).to(s.dtype)
        inverse_discount = 1 / torch.log1p(tau)
        gain = torch.exp2(labels) - 1
        weights = (gain[:, :, None] - gain[:, None, :]).abs() * (
            inverse_discount[:, :, None] - inverse_discount[:, None, :]).abs()
        return torch.where(self.better, weights, 0.0)


LISTWISE_LOSSES = {}


def _register(name):
    def add(fn):
        LISTWISE_LOSSES[name] = fn
        return fn
    return add


@_register("plackett_luce")
def plackett_luce_loss(b: ListBatch):
    """K-wise DPO / list-MLE: Σ_i [log Σ_{j ∈ {i} ∪ {j: i ≻ j}} exp(s_j) - s_i], s = β Δ.

    Direct Preference Optimization (arXiv:2305.18290), Sec. 4 / App. A.3, the
    Plackett-Luce model; list-MLE: Xia et al., "Listwise Approach to Learning to Rank"
    (ICML 2008). Each response is chosen from itself and the responses strictly
    below it, so ties are never pushed apart and the worst responses add 0. With
    top_k, only responses at positions < top_k (counting strictly better ones)
    contribute. K = 2 is DPO's -log σ(s_w - s_l).
    """
    terms = _masked_logsumexp(b.s[:, None, :], b.include_self) - b.s
    active = b.has_worse
    if b.params["top_k"] is not None:
        active = active & (b.position < b.params["top_k"])
    return torch.where(active, terms, 0.0).sum(-1)


@_register("lipo_lambda")
def lipo_lambda_loss(b: ListBatch):
    """LiPO-λ: Σ_{i ≻ j} λ_ij log(1 + exp(-(s_i - s_j))), λ from ListBatch.lambda_weights.

    LiPO: Listwise Preference Optimization through Learning-to-Rank (arXiv:2402.01878),
    the LiPO-λ objective (LambdaLoss weights, Wang et al. CIKM 2018). D uses the natural log, as
    the issue text; LiPO's log2 scales every λ by ln 2.
    """
    margins = b.s[:, :, None] - b.s[:, None, :]
    return (b.lambda_weights * F.softplus(-margins)).sum((-1, -2))


@_register("pro")
def pro_loss(b: ListBatch):
    """PRO: Σ_{k not worst} -log[exp(r_k/T_kk) / (exp(r_k/T_kk) + Σ_{k ≻ i} exp(r_i/T_ki))] - w r_best.

    Preference Ranking Optimization for Human Alignment (arXiv:2306.17492).
    Reference-free: r = ℓ / length, the mean token log-prob. With scores, 1/T_ki =
    ψ_k - ψ_i and 1/T_kk = max_i (ψ_k - ψ_i); with ranks, T = 1. The SFT term is
    w · (-r) of the best response (mean over tied best ones), w = pro_sft_weight.
    beta is not used.
    """
    r = b.mean_logps
    if b.from_scores:
        gap = torch.where(b.better, b.labels[:, :, None] - b.labels[:, None, :], 0.0)
        scale = gap + torch.diag_embed(gap.amax(-1))
    else:
        scale = b.include_self.to(r.dtype)
    scaled = r[:, None, :] * scale
    terms = _masked_logsumexp(scaled, b.include_self) - scaled.diagonal(dim1=-2, dim2=-1)
    ranking = torch.where(b.has_worse, terms, 0.0).sum(-1)
    best = b.hard_targets()
    sft = -(best * torch.where(b.mask, r, 0.0)).sum(-1)
    return ranking + b.params["pro_sft_weight"] * sft


def _list_cross_entropy(b: ListBatch, targets):
    log_probs = torch.where(b.mask, torch.log_softmax(torch.where(b.mask, b.s, -math.inf), -1), 0.0)
    return -(targets * log_probs).sum(-1)


@_register("adpo")
def adpo_loss(b: ListBatch):
    """Anchored listwise: KL(q || softmax(β Δ)) over the list, τ = 1/β.

    Anchored Direct Preference Optimization (ADPO), the listwise
    form KL(q || softmax((ℓ - ℓ_ref)/τ)). q: target='hard' is uniform over the best
    responses (one-hot without ties; K = 2 is DPO sigmoid), target='soft' is
    softmax(ψ / target_temperature).
    """
    q = b.hard_targets() if b.params["target"] == "hard" else b.soft_targets()
    return _list_cross_entropy(b, q) + torch.xlogy(q, q).sum(-1)


@_register("list_ce")
def list_ce_loss(b: ListBatch):
    """Soft-label list cross-entropy: -Σ_i q_i log softmax(β Δ)_i, q = softmax(ψ / target_temperature).

    ListNet's top-one cross-entropy (Cao et al., "Learning to Rank: From Pairwise
    Approach to Listwise Approach", ICML 2007) on DPO's implicit rewards. Differs from
    adpo with target='soft' by H(q), a constant. K = 2 is cDPO with label-flip
    probability σ((ψ_l - ψ_w) / T).
    """
    return _list_cross_entropy(b, b.soft_targets())


def _pairs_loss(b: ListBatch, weights):
    """Per-list weighted mean over the ordered pairs i ≻ j of the pairwise loss (0 without pairs).

    Every (i, j) of a list is evaluated, (i, i) where i ≻ j does not hold, and weighted 0: picking
    only the ordered pairs would need their number on the host, a sync per chunk of lists. (i, i)
    is a pair of finite, present-like values (δ = 0), so it adds exactly 0 to value and gradient."""
    ordered = b.better

    def pairs(values):
        if values is None:
            return None, None
        chosen = values[:, :, None].expand(ordered.shape)
        return chosen.reshape(-1), torch.where(ordered, values[:, None, :], chosen).reshape(-1)

    chosen, rejected = pairs(b.logps)
    ref_chosen, ref_rejected = pairs(b.ref)
    # An empty slot's length is 0; its (i, i) pair is length-normalised too.
    chosen_lengths, rejected_lengths = pairs(None if b.lengths is None else torch.where(b.mask, b.lengths, 1.0))
    spec = b.spec.pairwise
    losses = spec.losses(spec.batch({
        "chosen_logps": chosen, "rejected_logps": rejected, "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected, "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths,
        "nll_mean_length": b.nll_mean_length})).view(ordered.shape)
    weights = weights.to(losses.dtype)
    return (losses * weights).sum((-1, -2)) / weights.sum((-1, -2)).clamp_min(torch.finfo(losses.dtype).tiny)


@_register("all_pairs")
def all_pairs_loss(b: ListBatch):
    """Mean over the list's ordered pairs i ≻ j of any pairwise loss (pairwise_type, e.g. 'sigmoid', 'ipo').

    Every pairwise loss of prefops.losses.pairwise_loss consumes lists this way; K = 2
    is exactly that pairwise loss. Its scalar options (label_smoothing, simpo_gamma, ...)
    pass through.
    """
    return _pairs_loss(b, b.better)


@_register("dcg_pairwise")
def dcg_pairwise_loss(b: ListBatch):
    """DCG-weighted pairwise: Σ_{i ≻ j} λ_ij L_pair(i, j) / Σ_{i ≻ j} λ_ij, λ the LiPO lambda weights.

    Scalable Ranked Preference Optimization for Text-to-Image Generation (RankDPO,
    arXiv:2410.18013), for any pairwise_type; normalised by Σ λ so that K = 2
    is exactly the pairwise loss. With 'sigmoid', times Σ λ, it is lipo_lambda.
    """
    return _pairs_loss(b, b.lambda_weights)


PAIR_BASED = ("all_pairs", "dcg_pairwise")
LISTWISE_REFERENCE_FREE = ["pro"]  # self_play.py adds spo
# Loss types whose implicit reward is not β Δ: their rewards [P, K] from the batch.
IMPLICIT_REWARDS = {"pro": lambda b: b.mean_logps}


def _implicit_rewards(b: ListBatch, loss_type):
    """[P, K] rewards the loss optimises (detached), as the pairwise family defines them for pair-based types."""
    if loss_type in IMPLICIT_REWARDS:
        return IMPLICIT_REWARDS[loss_type](b)
    if loss_type in PAIR_BASED:
        spec = b.spec.pairwise
        flat = lambda values: None if values is None else values.reshape(-1)  # noqa: E731
        values = {"chosen_logps": flat(b.logps), "rejected_logps": flat(b.logps), "ref_chosen_logps": flat(b.ref),
                  "ref_rejected_logps": flat(b.ref), "chosen_lengths": flat(b.lengths),
                  "rejected_lengths": flat(b.lengths)}
        pairs = PairBatch(values, b.beta, spec.label_smoothing, spec.options)
        return b.beta * _rewards(pairs, spec.loss_types[0])[0].reshape(b.logps.shape)
    return b.s


def _masked_mean(values, where, dim=None):
    """Mean of values where `where` holds (padded slots may hold inf or NaN, e.g. a reward over length 0)."""
    total = torch.where(where, values, 0.0)
    if dim is None:
        return total.sum() / where.sum()
    return total.sum(dim) / where.sum(dim)


@torch.no_grad()
def listwise_metrics(b: ListBatch, loss_type) -> dict:
    rewards = _implicit_rewards(b, loss_type).detach()
    mask, better = b.mask, b.better
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    ahead = rewards[:, :, None] > rewards[:, None, :]
    ordered = better.any(-1).any(-1)  # lists with at least one ordered pair

    both = mask[:, :, None] & mask[:, None, :]
    upper = torch.ones_like(better[0]).triu(1)
    sign_r = torch.where(both & upper, torch.sign(rewards[:, :, None] - rewards[:, None, :]), zero)
    sign_l = torch.where(both & upper, torch.sign(b.labels[:, :, None] - b.labels[:, None, :]).to(rewards.dtype),
                         zero)
    untied = (sign_r != 0).sum((-1, -2)) * (sign_l != 0).sum((-1, -2))
    kendall = (sign_r * sign_l).sum((-1, -2)) / untied.clamp_min(1).to(rewards.dtype).sqrt()

    top_reward = torch.where(b.is_best, rewards, -math.inf).amax(1)
    other_reward = torch.where(mask & ~b.is_best, rewards, -math.inf).amax(1)
    metrics = {
        "rewards/accuracies": (better & ahead).sum() / better.sum().to(rewards.dtype),
        "rewards/kendall_tau": _masked_mean(kendall, ordered),
        "rewards/top1_accuracy": _masked_mean((top_reward > other_reward).to(rewards.dtype), ordered),
        "rewards/chosen": _masked_mean(rewards, b.is_best, 1).mean(),
        "rewards/rejected": _masked_mean(rewards, b.is_worst, 1).mean(),
        "rewards/mean": _masked_mean(rewards, mask),
        "logps/chosen": _masked_mean(b.logps, b.is_best, 1).mean(),
        "logps/rejected": _masked_mean(b.logps, b.is_worst, 1).mean(),
        "logps/mean": _masked_mean(b.logps, mask),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return {k: v.detach() for k, v in metrics.items()}


def _check_params(loss_type, params):
    if params["top_k"] is not None and (isinstance(params["top_k"], bool) or not isinstance(params["top_k"], int)
                                        or params["top_k"] < 1):
        raise ValueError(f"top_k must be an int >= 1 or None; got {params['top_k']!r}")
    if params["target"] not in ("hard", "soft"):
        raise ValueError(f"target must be 'hard' or 'soft'; got {params['target']!r}")
    check_beta(params["target_temperature"], "target_temperature")
    check_in_range(params["pro_sft_weight"], "pro_sft_weight", 0.0, math.inf, high_open=True)
    if loss_type in PAIR_BASED:
        types = params["pairwise_type"]
        names = [types] if isinstance(types, str) else list(types)
        batch_level = sorted(set(names) & set(_BATCH_LEVEL_PAIRWISE))
        if batch_level:
            raise ValueError(f"pairwise_type {batch_level} sorts pairs across the batch, so it is not a loss per "
                             f"list; {loss_type!r} takes any other pairwise type")


def _needs_reference(loss_type, params):
    if loss_type in LISTWISE_REFERENCE_FREE:
        return False
    if loss_type in PAIR_BASED:
        types = params["pairwise_type"]
        return any(name not in REFERENCE_FREE for name in ([types] if isinstance(types, str) else types))
    return True


def _raise_small_list(sizes):
    p = int((sizes < 2).nonzero()[0])
    raise ValueError(f"list {p} has {int(sizes[p])} response(s); every list needs at least 2")


def _lengths_check(lengths, mask) -> ValueCheck:
    bad = mask & ~(lengths > 0)

    def fail():
        p, k = _first_bad(bad)
        raise ValueError(f"lengths of list {p} is {lengths[p, k].item()} at response {k}; every response needs at "
                         "least one completion token")
    return ValueCheck(bad.any(), fail)


class ListwiseSpec:
    """A listwise loss with its options checked: loss type, β, LISTWISE_PARAM_DEFAULTS and, for the
    pair-based types, the pairwise loss of prefops.losses.pairwise (a PairwiseSpec).

    listwise_loss checks everything and evaluates in one call. A caller that evaluates one batch's
    loss part by part (prefops.ListwiseLoss: once per chunk of lists, inside its forward) gets the
    whole batch's ListBatch and the checks of its values from prepare(), runs the checks once, then
    calls losses() per part (ListBatch.part) and metrics() once: neither checks anything or reads a
    value on the host, so the GPU never waits for them.
    """

    def __init__(self, loss_type="plackett_luce", beta=0.1, **params):
        if loss_type not in LISTWISE_LOSSES:
            raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(sorted(LISTWISE_LOSSES))}")
        self.loss_type, self.beta = loss_type, check_beta(beta)
        unknown = sorted(set(params) - set(LISTWISE_PARAM_DEFAULTS) - set(PAIRWISE_OPTIONS))
        if unknown:
            valid = sorted(set(LISTWISE_PARAM_DEFAULTS) | set(PAIRWISE_OPTIONS))
            raise TypeError(f"unknown parameter(s) {unknown}; valid: {', '.join(valid)}")
        pairwise_given = sorted(set(params) & (set(PAIRWISE_OPTIONS) | {"pairwise_type"}))
        if pairwise_given and loss_type not in PAIR_BASED:
            raise ValueError(f"{pairwise_given} apply to the pair-based loss types {list(PAIR_BASED)} only; "
                             f"loss_type {loss_type!r} does not use them")
        self.params = {**LISTWISE_PARAM_DEFAULTS, **params}
        _check_params(loss_type, self.params)
        self.pairwise = None
        if loss_type in PAIR_BASED:
            options = {name: self.params[name] for name in PAIRWISE_OPTIONS if name in self.params}
            options.pop("nll_mean_length", None)  # a value of the batch, not an option
            self.pairwise = PairwiseSpec(self.params["pairwise_type"], self.beta, **options)

    def prepare(self, mask, *, scores=None, ranks=None, ref_logps=None, lengths=None, logps=None):
        """(ListBatch of the whole batch, the checks of its values for prefops.checks.run_value_checks).

        Tensors [P, K] on mask's device (mask: bool, True = present); exactly one of scores and
        ranks. Everything that needs no value is checked here. logps may be None: the fused path's
        come per part, ListBatch.part."""
        if (scores is None) == (ranks is None):
            raise ValueError("pass exactly one of scores (larger = better) and ranks (smaller = better)")
        dtype = compute_dtype(logps, ref_logps)
        sizes = mask.sum(1)
        checks = [ValueCheck((sizes < 2).any(), lambda: _raise_small_list(sizes))]
        if logps is not None:
            checks.append(_finite_check(logps.detach(), mask, "logps"))
        if scores is not None:
            if scores.dtype == torch.bool:
                raise TypeError("scores must be numbers, not bool")
            checks.append(_finite_check(scores.double(), mask, "scores"))
            labels = torch.where(mask, scores.to(dtype), 0.0)
        else:
            labels, rank_checks = _ranks_labels(ranks, mask)
            checks += rank_checks
            labels = labels.to(dtype)
        if _needs_reference(self.loss_type, self.params) and ref_logps is None:
            what = (f"pairwise_type {self.params['pairwise_type']!r}" if self.loss_type in PAIR_BASED
                    else f"loss_type {self.loss_type!r}")
            raise ValueError(f"{what} needs ref_logps (the reference's sequence log-probs)")
        if lengths is not None:
            checks.append(_lengths_check(lengths, mask))
        if ref_logps is not None:
            checks.append(_finite_check(ref_logps.double(), mask, "ref_logps"))
        clean = lambda x: None if x is None else torch.where(mask, x.to(dtype), 0.0)  # noqa: E731
        lengths = clean(lengths)
        batch = ListBatch(self, clean(logps), clean(ref_logps), labels, mask, lengths, scores is not None,
                          self._nll_mean_length(labels, mask, lengths))
        return batch, checks

    def _nll_mean_length(self, labels, mask, lengths):
        """The caller's nll_mean_length (a whole step's, across micro-batches and ranks), else this
        batch's mean chosen length over its ordered pairs, on the device; None without an NLL term."""
        if "nll_mean_length" in self.params:
            return self.params["nll_mean_length"]
        if self.pairwise is None or lengths is None or not has_nll_term(self.pairwise.loss_types,
                                                                         self.pairwise.options):
            return None
        better = preference_matrix(labels, mask)
        return (better.sum(-1) * lengths).sum() / better.sum().clamp_min(1)

    def losses(self, batch: ListBatch) -> torch.Tensor:
        """Per-list loss [P]."""
        try:
            return LISTWISE_LOSSES[self.loss_type](batch)
        except _MissingInput as missing:
            raise ValueError(f"loss_type {self.loss_type!r} needs {missing.argument}, which was not given") from None

    def metrics(self, batch: ListBatch) -> dict:
        """Detached scalars over the batch's lists (see the module docstring)."""
        try:
            return listwise_metrics(batch, self.loss_type)
        except _MissingInput as missing:
            raise ValueError(f"loss_type {self.loss_type!r} needs {missing.argument}, which was not given") from None


def listwise_loss(logps, ref_logps=None, *, scores=None, ranks=None, loss_type="plackett_luce", beta=0.1,
                  lengths=None, mask=None, list_ids=None, **params):
    """Per-list listwise loss [P] and metrics from sequence log-prob sums.

    Args:
        logps: [P, K] policy sums (padded lists; `mask` [P, K] bool, True = present, default
            all present), or [S] with `list_ids` [S] (packed; lists numbered by id).
        ref_logps: reference sums of the same shape (not needed by 'pro', nor by
            'all_pairs' / 'dcg_pairwise' with reference-free pairwise types).
        scores (larger = better) or ranks (smaller = better; a tied ordering): exactly one.
        loss_type: a name in LISTWISE_LOSSES.
        lengths: completion token counts of the responses (pro; length-normalised pairwise types).
        params: LISTWISE_PARAM_DEFAULTS (top_k, target, target_temperature, pairwise_type,
            pro_sft_weight) and, for the pair-based types, PAIRWISE_OPTIONS of pairwise_loss.

    Every check runs here, with one host read of the values it checks (ListwiseSpec says how to
    check once and evaluate many times).

    Returns (losses [P] in fp32, fp64 for fp64 inputs; metrics: dict of detached scalars).
    The batch loss is losses.mean().
    """
    spec = ListwiseSpec(loss_type, beta, **params)
    if not isinstance(logps, torch.Tensor) or not logps.dtype.is_floating_point:
        raise TypeError("logps must be a floating-point torch.Tensor")
    index = None
    if list_ids is not None:
        if logps.dim() != 1 or mask is not None:
            raise ValueError("the packed form takes logps [S] with list_ids [S] and no mask")
        if tuple(list_ids.shape) != tuple(logps.shape):
            raise ValueError(f"list_ids must have the shape of logps {tuple(logps.shape)}; got "
                             f"{tuple(list_ids.shape)}")
        index = pad_lists(list_ids.to(logps.device))
        mask = index >= 0
    elif logps.dim() != 2:
        raise ValueError(f"logps must be [P, K] (padded lists, with mask) or [S] with list_ids; "
                         f"got shape {tuple(logps.shape)}")
    shape = tuple(index.shape) if index is not None else tuple(logps.shape)
    if shape[1] < 2:
        raise ValueError(f"every list needs K >= 2 responses; logps has K = {shape[1]}")
    if mask is None:
        mask = torch.ones(shape, dtype=torch.bool, device=logps.device)
    elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
        raise ValueError(f"mask must be a bool tensor of shape {shape} (True = present)")
    mask = mask.to(logps.device)
    flat_size = logps.shape[0]
    if index is not None:
        logps = _padded(logps, "logps", shape, logps.device, index, flat_size)
    values = {name: _padded(value, name, shape, logps.device, index, flat_size)
              for name, value in (("ref_logps", ref_logps), ("scores", scores), ("ranks", ranks),
                                  ("lengths", lengths))}
    batch, checks = spec.prepare(mask, logps=logps, **values)
    run_value_checks(checks)
    return spec.losses(batch), spec.metrics(batch)
