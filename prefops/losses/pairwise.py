"""Sequence-level pairwise preference losses (the DPO family).

Every loss reads one value per sequence: the log-probability of the completion
summed over its tokens, for the policy and (where the loss needs it) the frozen
reference. The fused path and the reference path differ only in where those
sums come from, so both call `pairwise_loss`.

Notation in the docstrings: s_w, s_l are the policy sums for the chosen and
rejected completion, r_w, r_l the reference sums, Δ_w = s_w - r_w and
Δ_l = s_l - r_l the log-ratios, δ = Δ_w - Δ_l, n_w, n_l the completion lengths
and σ the logistic function. Formulas follow TRL's DPOTrainer (and its CPO /
ORPO trainers for the reference-free losses) wherever TRL has the loss type.
"""
from __future__ import annotations

import math
from functools import cached_property

import torch
import torch.nn.functional as F

from ..checks import ValueCheck, run_value_checks
from .token_level import tdpo_loss

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The f-DPO reparameterisation leaves a β·log Z(x) term that only cancels in the
# chosen-minus-rejected difference, so only losses built on δ generalise.
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# exp() of more than this overflows fp32 (TRL uses the same bound).
_ALPHA_EXPONENT_MAX = 80.0

# Scalar options of the losses: checked on the host, once per call of pairwise_loss (PairwiseSpec).
OPTION_DEFAULTS = {
    "discopop_tau": 0.05,
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "simpo_gamma": 0.5,
    "gamma_beta_ratio": None,
    "cpo_alpha": 1.0,
    # ORPO's L = L_SFT + λ L_OR: False keeps only λ L_OR (Liger's compute_nll_loss=False).
    "orpo_nll": True,
    "alpha": 0.0,
    "dpop_lambda": 50.0,
    "modpo_weights": None,
    "tdpo_alpha": 0.5,
}
# Tensor parameters, one value per pair (the MODPO margins [P] or [P, K]), default None.
PAIR_TENSORS = (
    "preference_probs",
    "pair_weights",
    "chosen_margin_rewards",
    "rejected_margin_rewards",
    # The NLL term on other targets than the preference log-probs (TRL's ORPO takes it over prompt and
    # completion): per-pair sums of log p over the chosen sequence's NLL tokens, and their counts.
    "chosen_nll_logps",
    "chosen_nll_lengths",
    # TDPO: per-pair Σ_t KL(π_ref || π_θ) over the completion (prefops.linear_token_kl).
    "chosen_seq_kl",
    "rejected_seq_kl",
)
# Mean chosen length of the whole batch (a number or a 0-dim tensor), for callers that evaluate the
# loss on parts of a batch (the budget strategy) and need the NLL term to stay additive.
BATCH_VALUES = ("nll_mean_length",)
PARAM_DEFAULTS = {**OPTION_DEFAULTS, **dict.fromkeys(PAIR_TENSORS + BATCH_VALUES)}
# The [P] tensors that share one shape and are computed in one dtype.
SEQUENCE_VALUES = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "chosen_lengths",
                   "rejected_lengths", "preference_probs", "pair_weights", "chosen_seq_kl", "rejected_seq_kl",
                   "chosen_nll_logps", "chosen_nll_lengths")


class _MissingInput(Exception):
    """A loss asked for an optional input that the caller did not pass."""

    def __init__(self, argument: str):
        super().__init__(argument)
        self.argument = argument


def compute_dtype(*tensors) -> torch.dtype:
    """fp64 when any input is fp64 (high-precision references), fp32 otherwise."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def check_beta(beta, name: str = "beta") -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {beta!r}")
    return float(beta)


def check_in_range(value, name: str, low: float, high: float, *, high_open: bool = False, low_open: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}; got {value!r}")
    return float(value)


def check_sequence_shapes(tensors: dict) -> None:
    """Check named 1-D tensors (None: not given) of one shape."""
    shape = None
    for name, value in tensors.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
        if value.dim() != 1:
            raise ValueError(f"{name} must have shape [P] (one value per sequence); got {tuple(value.shape)}")
        if shape is None:
            shape, first = tuple(value.shape), name
        elif tuple(value.shape) != shape:
            raise ValueError(f"{name} must have the shape of {first} {shape}; got {tuple(value.shape)}")


def check_sequence_values(tensors: dict, dtype: torch.dtype) -> dict:
    """Check named 1-D tensors of one shape; return them cast to `dtype` (None stays None)."""
    check_sequence_shapes(tensors)
    return {name: None if value is None else value.to(dtype) for name, value in tensors.items()}


def lengths_check(lengths: torch.Tensor | None, name: str) -> ValueCheck | None:
    """Every completion has a token (lengths > 0), for checks.run_value_checks."""
    if lengths is None:
        return None
    empty = lengths <= 0

    def fail():
        index = int(empty.nonzero()[0])
        raise ValueError(
            f"{name}[{index}] = {lengths[index].item():g}: pair {index} has no completion tokens "
            "(every completion needs at least one token)"
        )
    return ValueCheck(empty.any(), fail)


def smoothed_logsigmoid_loss(logits: torch.Tensor, eps) -> torch.Tensor:
    """-(1 - ε) log σ(x) - ε log σ(-x): the cDPO loss on logits x with label-flip probability ε."""
    if isinstance(eps, (int, float)) and eps == 0:
        return -F.logsigmoid(logits)  # two kernels instead of six, on every step of plain DPO and SimPO
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


class _Log1mexp(torch.autograd.Function):
    """log(1 - exp(x)) for x < 0, switching branch at -log 2 to avoid cancellation.

    x is capped at -eps² so a log-prob that rounded to 0 (probability 1) stays finite. The
    derivative, -1 / expm1(-x), is written out: autograd through the two branches and their
    guards would take three times the kernels, on every chunk of every ORPO step.
    """

    @staticmethod
    def forward(ctx, x):
        capped = x.clamp(max=-torch.finfo(x.dtype).eps ** 2)
        ctx.save_for_backward(x, capped)
        # Near 0 the far branch gives -inf: it is not selected there, and nothing differentiates it.
        return torch.where(capped < -math.log(2), torch.log1p(-torch.exp(capped)), torch.log(-torch.expm1(capped)))

    @staticmethod
    def backward(ctx, grad):
        x, capped = ctx.saved_tensors
        # Above the cap the value is constant, as through a clamp.
        return torch.where(x > capped, 0.0, grad / -torch.expm1(-capped))


log1mexp = _Log1mexp.apply


class PairBatch:
    """One call's inputs in the compute dtype plus the derived values the losses share.

    values: the tensors (SEQUENCE_VALUES, PAIR_TENSORS, BATCH_VALUES; None or absent when not
    given); params: the scalar options (OPTION_DEFAULTS). Derived values are cached properties,
    so a weighted combination of losses computes each of them once. An optional input that a
    loss needs but did not get raises _MissingInput naming the argument.
    """

    def __init__(self, values: dict, beta: float, label_smoothing: float, params: dict):
        self.values = values
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.params = params
        self.chosen = values["chosen_logps"]
        self.rejected = values["rejected_logps"]

    def get(self, name: str) -> torch.Tensor:
        value = self.values.get(name)
        if value is None:
            raise _MissingInput(name)
        return value

    @cached_property
    def chosen_logratios(self):
        return self.chosen - self.get("ref_chosen_logps")

    @cached_property
    def rejected_logratios(self):
        return self.rejected - self.get("ref_rejected_logps")

    @cached_property
    def scores(self):
        """f'(π/π_ref) of the chosen and rejected completion: the f-DPO generalisation of Δ."""
        kind = self.params["f_divergence_type"]
        chosen, rejected = self.chosen_logratios, self.rejected_logratios
        if kind == "reverse_kl":
            return chosen, rejected
        if kind == "forward_kl":  # f'(u) = 1 - 1/u, the α = 0 member of the α family
            return _alpha_scores(chosen, 0.0), _alpha_scores(rejected, 0.0)
        if kind == "js_divergence":  # f'(u) = log(2u / (1 + u))
            return math.log(2) + F.logsigmoid(chosen), math.log(2) + F.logsigmoid(rejected)
        coef = self.params["f_alpha_divergence_coef"]
        if abs(coef - 1.0) < 1e-6:  # the α → 1 limit is log u, reverse KL
            return chosen, rejected
        return _alpha_scores(chosen, coef), _alpha_scores(rejected, coef)

    @cached_property
    def delta(self):
        chosen, rejected = self.scores
        return chosen - rejected

    @cached_property
    def normalized_delta(self):
        chosen, rejected = self.scores
        return chosen / self.get("chosen_lengths") - rejected / self.get("rejected_lengths")

    @cached_property
    def chosen_mean_logps(self):
        return self.chosen / self.get("chosen_lengths")

    @cached_property
    def rejected_mean_logps(self):
        return self.rejected / self.get("rejected_lengths")

    @cached_property
    def nll(self):
        """Per-pair share of the chosen completions' token-mean NLL over the batch.

        -s_w / mean(n_w): its mean over pairs is -Σ s_w / Σ n_w, the cross-entropy
        that TRL's sft / CPO / ORPO terms average over all chosen tokens. With
        chosen_nll_logps (sums over other NLL targets) it is -s^nll_w / mean(n^nll_w).
        """
        logps, lengths = self.values.get("chosen_nll_logps"), "chosen_nll_lengths"
        if logps is None:
            logps, lengths = self.chosen, "chosen_lengths"
        mean_length = self.values.get("nll_mean_length")
        return -logps / (self.get(lengths).mean() if mean_length is None else mean_length)

    @cached_property
    def log_odds(self):
        """log[odds(y_w) / odds(y_l)] with odds(y) = p / (1 - p) on mean token log-probs (ORPO)."""
        chosen, rejected = self.chosen_mean_logps, self.rejected_mean_logps
        # One log1mexp over both columns: a dozen kernels per evaluation, forward and backward.
        log1mexp_chosen, log1mexp_rejected = log1mexp(torch.stack([chosen, rejected])).unbind()
        return (chosen - rejected) - (log1mexp_chosen - log1mexp_rejected)

    @cached_property
    def label_eps(self):
        """Per-pair probability that the label is flipped: 1 - preference_probs, else label_smoothing."""
        probs = self.values.get("preference_probs")
        return self.label_smoothing if probs is None else 1 - probs

    def alphapo_rewards(self):
        """AlphaPO reward (1 - p^-α) / α on mean token log-probs; log p at α = 0."""
        alpha = self.params["alpha"]
        if alpha == 0:
            return self.chosen_mean_logps, self.rejected_mean_logps
        return (-torch.expm1(-alpha * self.chosen_mean_logps) / alpha,
                -torch.expm1(-alpha * self.rejected_mean_logps) / alpha)

    def simpo_margin(self):
        ratio = self.params["gamma_beta_ratio"]
        return ratio if ratio is not None else self.params["simpo_gamma"] / self.beta


def _alpha_scores(logratios, coef):
    """(u^(α-1) - 1) / (α - 1) with u = π / π_ref, exponent clamped so exp stays finite."""
    exponent = torch.clamp((coef - 1.0) * logratios, max=_ALPHA_EXPONENT_MAX)
    return torch.expm1(exponent) / (coef - 1.0)


LOSSES = {}


def _register(name):
    def add(fn):
        LOSSES[name] = fn
        return fn
    return add


@_register("sigmoid")
def sigmoid_loss(b: PairBatch):
    """DPO: -log σ(β δ); with label smoothing ε (cDPO) -(1-ε) log σ(β δ) - ε log σ(-β δ).

    Direct Preference Optimization: Your Language Model is Secretly a Reward Model
    (arXiv:2305.18290). cDPO: E. Mitchell, "A note on DPO with noisy preferences
    and relationship to IPO" (2023), as analysed in arXiv:2403.00409. A per-pair
    `preference_probs` p gives the soft-label version with ε = 1 - p.
    """
    return smoothed_logsigmoid_loss(b.beta * b.delta, b.label_eps)


@_register("hinge")
def hinge_loss(b: PairBatch):
    """SLiC hinge: max(0, 1 - β δ).

    SLiC-HF: Sequence Likelihood Calibration with Human Feedback (arXiv:2305.10425).
    """
    return torch.relu(1 - b.beta * b.delta)


@_register("ipo")
def ipo_loss(b: PairBatch):
    """IPO on per-token log-ratios: (Δ_w/n_w - Δ_l/n_l - 1/(2β))².

    A General Theoretical Paradigm to Understand Learning from Human Preferences
    (arXiv:2310.12036), Eq. 17; the length normalisation is TRL's (agreed with the authors).
    """
    return (b.normalized_delta - 1 / (2 * b.beta)) ** 2


@_register("exo_pair")
def exo_pair_loss(b: PairBatch):
    """EXO-pref, K = 2: KL(softmax(β·[Δ_w, Δ_l]) || [1-ε, ε]) with ε = label_smoothing > 0.

    Towards Efficient Exact Optimization of Language Model Alignment (arXiv:2402.00856), Eq. 16.
    """
    logits, eps = b.beta * b.delta, b.label_smoothing
    return (torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-eps))
            + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(eps)))


@_register("nca_pair")
def nca_pair_loss(b: PairBatch):
    """NCA: -log σ(β Δ_w) - ½ log σ(-β Δ_w) - ½ log σ(-β Δ_l).

    Noise Contrastive Alignment of Language Models with Explicit Rewards (arXiv:2402.05369).
    """
    chosen, rejected = b.beta * b.chosen_logratios, b.beta * b.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


@_register("robust")
def robust_loss(b: PairBatch):
    """Robust DPO: [-(1-ε) log σ(β δ) + ε log σ(-β δ)] / (1 - 2ε), ε ∈ [0, 0.5) the flip rate.

    Provably Robust DPO: Aligning Language Models with Noisy Feedback (arXiv:2403.00409).
    """
    logits, eps = b.beta * b.delta, b.label_smoothing
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


@_register("bco_pair")
def bco_pair_loss(b: PairBatch):
    """Paired BCO without the reward shift: -log σ(β Δ_w) - log σ(-β Δ_l).

    Binary Classifier Optimization for Large Language Model Alignment (arXiv:2404.04656).
    """
    return -F.logsigmoid(b.beta * b.chosen_logratios) - F.logsigmoid(-b.beta * b.rejected_logratios)


def _sppo(b: PairBatch, probs):
    # The winner's log-ratio is pushed to (P(y_w ≻ y_l) - ½)/β and the loser's to the opposite.
    target = (probs - 0.5) / b.beta
    return (b.chosen_logratios - target) ** 2 + (b.rejected_logratios + target) ** 2


@_register("sppo_hard")
def sppo_hard_loss(b: PairBatch):
    """SPPO with hard labels: (Δ_w - 1/(2β))² + (Δ_l + 1/(2β))².

    Self-Play Preference Optimization for Language Model Alignment (arXiv:2405.00675), Eq. 4.7 with P = 1.
    """
    return _sppo(b, 1.0)


@_register("sppo")
def sppo_soft_loss(b: PairBatch):
    """SPPO with soft labels p = preference_probs: (Δ_w - (p-½)/β)² + (Δ_l + (p-½)/β)².

    Self-Play Preference Optimization for Language Model Alignment (arXiv:2405.00675), Eq. 4.7
    with P(y_w ≻ π) estimated per pair (e.g. by PairRM).
    """
    return _sppo(b, b.get("preference_probs"))


def _aot(b: PairBatch, chosen, rejected):
    # Sorting matches the quantiles of the two distributions (first-order stochastic dominance).
    delta = torch.sort(chosen, dim=0).values - torch.sort(rejected, dim=0).values
    return smoothed_logsigmoid_loss(b.beta * delta, b.label_smoothing)


@_register("aot")
def aot_loss(b: PairBatch):
    """AOT, paired: smoothed -log σ(β (sort(s_w - s_l) - sort(r_w - r_l))) over the batch.

    Distributional Preference Alignment of LLMs via Optimal Transport (arXiv:2406.05882).
    """
    return _aot(b, b.chosen - b.rejected, b.get("ref_chosen_logps") - b.get("ref_rejected_logps"))


@_register("aot_unpaired")
def aot_unpaired_loss(b: PairBatch):
    """AOT, unpaired: smoothed -log σ(β (sort(Δ_w) - sort(Δ_l))) over the batch.

    Distributional Preference Alignment of LLMs via Optimal Transport (arXiv:2406.05882).
    """
    return _aot(b, b.chosen_logratios, b.rejected_logratios)


@_register("apo_zero")
def apo_zero_loss(b: PairBatch):
    """APO-zero: 1 - σ(β Δ_w) + σ(β Δ_l) (raise chosen, lower rejected).

    Anchored Preference Optimization and Contrastive Revisions (arXiv:2408.06266), Eq. 7.
    """
    return 1 - torch.sigmoid(b.beta * b.chosen_logratios) + torch.sigmoid(b.beta * b.rejected_logratios)


@_register("apo_down")
def apo_down_loss(b: PairBatch):
    """APO-down: σ(β Δ_w) + 1 - σ(β (Δ_w - Δ_l)) (lower both, rejected more).

    Anchored Preference Optimization and Contrastive Revisions (arXiv:2408.06266), Eq. 8.
    """
    chosen, rejected = b.chosen_logratios, b.rejected_logratios
    return torch.sigmoid(b.beta * chosen) + 1 - torch.sigmoid(b.beta * (chosen - rejected))


@_register("discopop")
def discopop_loss(b: PairBatch):
    """DiscoPOP (log-ratio modulated): (1 - m) (-log σ(x)) + m e^(-x), x = β δ, m = σ(x / τ).

    Discovering Preference Optimization Algorithms with and for Large Language Models
    (arXiv:2406.08414), Eq. 5. m e^(-x) is evaluated as exp(log σ(x/τ) - x) so a very
    negative x gives a large finite value instead of 0 · inf.
    """
    logits, tau = b.beta * b.delta, b.params["discopop_tau"]
    modulation = torch.sigmoid(logits / tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(F.logsigmoid(logits / tau) - logits)


@_register("sft")
def sft_loss(b: PairBatch):
    """NLL of the chosen completion, token-averaged over the batch; weighted, it is the RPO term.

    Iterative Reasoning Preference Optimization (arXiv:2404.19733) adds it to DPO;
    TRL's loss_type=["sigmoid", "sft"] with loss_weights=[1, α].
    """
    return b.nll


@_register("sigmoid_norm")
def sigmoid_norm_loss(b: PairBatch):
    """Length-normalised DPO: -log σ(β (Δ_w/n_w - Δ_l/n_l)).

    Direct Preference Optimization (arXiv:2305.18290) on per-token log-ratios, as
    TRL's sigmoid_norm (the normalisation of SimPO, arXiv:2405.14734, applied to DPO).
    """
    return -F.logsigmoid(b.beta * b.normalized_delta)


@_register("dpop")
def dpop_loss(b: PairBatch):
    """DPO-Positive: -log σ(β (δ - λ max(0, r_w - s_w))), λ = dpop_lambda.

    Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive (arXiv:2402.13228).
    """
    penalty = b.params["dpop_lambda"] * torch.relu(-b.chosen_logratios)
    return -F.logsigmoid(b.beta * (b.chosen_logratios - b.rejected_logratios - penalty))


@_register("modpo")
def modpo_loss(b: PairBatch):
    """MODPO: -log σ((β δ - w_rest · (R_w - R_l)) / w_0), w = modpo_weights = [w_0, *w_rest].

    Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference
    Optimization (arXiv:2310.03708). R_w, R_l are the scores [P] or [P, K] of the other
    K objectives' reward models (chosen_margin_rewards, rejected_margin_rewards).
    """
    weights = b.params["modpo_weights"]
    if weights is None:
        raise _MissingInput("modpo_weights")
    margin = (b.get("chosen_margin_rewards") - b.get("rejected_margin_rewards")).to(b.chosen.dtype)
    margin = margin.reshape(margin.shape[0], -1)
    # Products with Python numbers: a tensor of the weights would be a copy to the device per call.
    weighted = margin[:, 0] * weights[1]
    for column, weight in enumerate(weights[2:], 1):
        weighted = weighted + margin[:, column] * weight
    dpo_logratio = b.chosen_logratios - b.rejected_logratios
    return -F.logsigmoid((b.beta * dpo_logratio - weighted) / weights[0])


@_register("simpo")
def simpo_loss(b: PairBatch):
    """SimPO: smoothed -log σ(β (s_w/n_w - s_l/n_l) - γ), γ = simpo_gamma (or β · gamma_beta_ratio).

    SimPO: Simple Preference Optimization with a Reference-Free Reward (arXiv:2405.14734).
    """
    logits = b.chosen_mean_logps - b.rejected_mean_logps - b.simpo_margin()
    return smoothed_logsigmoid_loss(b.beta * logits, b.label_eps)


@_register("alphapo")
def alphapo_loss(b: PairBatch):
    """AlphaPO: SimPO with reward (1 - p^-α)/α, p = exp(s/n): smoothed -log σ(β (u_w - u_l) - γ).

    AlphaPO: Reward Shape Matters for LLM Alignment (arXiv:2501.03884); α = `alpha`.
    """
    chosen, rejected = b.alphapo_rewards()
    return smoothed_logsigmoid_loss(b.beta * (chosen - rejected - b.simpo_margin()), b.label_eps)


@_register("cpo")
def cpo_loss(b: PairBatch):
    """CPO: smoothed -log σ(β (s_w - s_l)) + cpo_alpha · NLL(chosen).

    Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
    Machine Translation (arXiv:2401.08417), Eq. 3 plus the behaviour-cloning term.
    """
    preference = smoothed_logsigmoid_loss(b.beta * (b.chosen - b.rejected), b.label_eps)
    alpha = b.params["cpo_alpha"]
    return preference + alpha * b.nll if alpha else preference


@_register("orpo")
def orpo_loss(b: PairBatch):
    """ORPO: NLL(chosen) - β log σ(log odds ratio), odds on mean token log-probs; orpo_nll=False drops the NLL.

    ORPO: Monolithic Preference Optimization without Reference Model (arXiv:2403.07691), Eqs. 4-7:
    L = L_SFT + λ L_OR with λ = β, as TRL's ORPOTrainer. The NLL is over chosen_nll_logps when given.
    """
    odds_ratio = -b.beta * F.logsigmoid(b.log_odds)
    return b.nll + odds_ratio if b.params["orpo_nll"] else odds_ratio


# Losses that also read per-sequence token-level KL sums (chosen_seq_kl, rejected_seq_kl).
TOKEN_LEVEL_LOSSES = {}


def _tdpo(variant):
    def loss(b: PairBatch):
        return tdpo_loss(b.chosen_logratios, b.rejected_logratios, b.get("chosen_seq_kl"), b.get("rejected_seq_kl"),
                         beta=b.beta, alpha=b.params["tdpo_alpha"], variant=variant)
    loss.__doc__ = f"{variant.upper()}; see prefops.losses.token_level.tdpo_loss."
    TOKEN_LEVEL_LOSSES[variant] = loss


_tdpo("tdpo1")
_tdpo("tdpo2")

# Losses that read no reference log-probs (tests/test_pairwise_losses.py checks it against LOSSES).
REFERENCE_FREE = ("simpo", "alphapo", "cpo", "orpo", "sft")

# Implicit reward each reference-free loss optimises (logged as rewards/*).
_IMPLICIT_REWARDS = {
    "simpo": lambda b: (b.chosen_mean_logps, b.rejected_mean_logps),
    "orpo": lambda b: (b.chosen_mean_logps, b.rejected_mean_logps),
    "alphapo": PairBatch.alphapo_rewards,
    "cpo": lambda b: (b.chosen, b.rejected),
    # TDPO logs β (Δ + SeqKL).
    **{name: lambda b: (b.chosen_logratios + b.get("chosen_seq_kl"), b.rejected_logratios + b.get("rejected_seq_kl"))
       for name in ("tdpo1", "tdpo2")},
}

_EXTRA_METRICS = {
    "orpo": lambda b: {"log_odds_ratio": F.logsigmoid(b.log_odds).mean(), "log_odds_chosen": b.log_odds.mean(),
                       **({"nll_loss": b.nll.mean()} if b.params["orpo_nll"] else {})},
    "cpo": lambda b: {"nll_loss": b.nll.mean()} if b.params["cpo_alpha"] else {},
    "sft": lambda b: {"nll_loss": b.nll.mean()},
    **{name: lambda b: {"kl/chosen": b.get("chosen_seq_kl").mean(), "kl/rejected": b.get("rejected_seq_kl").mean()}
       for name in ("tdpo1", "tdpo2")},
}


def _rewards(b: PairBatch, first_type: str):
    if first_type in _IMPLICIT_REWARDS:
        return _IMPLICIT_REWARDS[first_type](b)
    try:
        return b.chosen_logratios, b.rejected_logratios
    except _MissingInput:
        return b.chosen, b.rejected


def _metrics(b: PairBatch, loss_types) -> dict:
    with torch.no_grad():
        chosen, rejected = (b.beta * r for r in _rewards(b, loss_types[0]))
        metrics = {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": b.chosen.mean(),
            "logps/rejected": b.rejected.mean(),
        }
        for name in loss_types:
            if name in _EXTRA_METRICS:
                metrics.update(_EXTRA_METRICS[name](b))
    return {k: v.detach() for k, v in metrics.items()}


def _check_params(loss_types, beta, label_smoothing, params) -> None:
    check_beta(beta)
    check_in_range(label_smoothing, "label_smoothing", 0.0, 1.0)
    if "robust" in loss_types:
        check_in_range(label_smoothing, "label_smoothing (loss_type 'robust')", 0.0, 0.5, high_open=True)
    if "exo_pair" in loss_types:
        check_in_range(label_smoothing, "label_smoothing (loss_type 'exo_pair')", 0.0, 1.0,
                       low_open=True, high_open=True)
    kind = params["f_divergence_type"]
    if kind not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {', '.join(map(repr, F_DIVERGENCES))}; got {kind!r}")
    if kind != "reverse_kl" and not set(loss_types) <= set(F_DIVERGENCE_LOSSES):
        raise ValueError(
            f"f_divergence_type={kind!r} needs every loss_type in {list(F_DIVERGENCE_LOSSES)} "
            f"(the others have no f-divergence form); got {list(loss_types)}"
        )
    check_in_range(params["f_alpha_divergence_coef"], "f_alpha_divergence_coef", -1e6, 1e6)
    check_beta(params["discopop_tau"], "discopop_tau")
    check_in_range(params["cpo_alpha"], "cpo_alpha", 0.0, math.inf, high_open=True)
    if not isinstance(params["orpo_nll"], bool):
        raise ValueError(f"orpo_nll must be True or False; got {params['orpo_nll']!r}")
    check_in_range(params["dpop_lambda"], "dpop_lambda", 0.0, math.inf, high_open=True)
    check_in_range(params["alpha"], "alpha", -1e6, 1e6)
    check_in_range(params["tdpo_alpha"], "tdpo_alpha", 0.0, 1e6)
    check_in_range(params["simpo_gamma"], "simpo_gamma", -1e6, 1e6)
    if params["gamma_beta_ratio"] is not None:
        check_in_range(params["gamma_beta_ratio"], "gamma_beta_ratio", -1e6, 1e6)
    if params["modpo_weights"] is not None:
        weights = [float(w) for w in params["modpo_weights"]]
        if len(weights) < 2 or weights[0] <= 0 or not all(math.isfinite(w) for w in weights):
            raise ValueError(
                "modpo_weights must be finite [w_0, w_1, ..., w_K] with w_0 > 0 (the weight of the objective "
                f"being trained) and K >= 1; got {params['modpo_weights']!r}"
            )
        params["modpo_weights"] = weights


def has_nll_term(loss_types, params) -> bool:
    """Whether some loss of loss_types reads the NLL term (params: PARAM_DEFAULTS and the caller's)."""
    return ("sft" in loss_types or ("cpo" in loss_types and params["cpo_alpha"] > 0)
            or ("orpo" in loss_types and params["orpo_nll"]))


def split_params(params: dict) -> tuple[dict, dict]:
    """pairwise_loss's keyword parameters -> (scalar options, tensors); TypeError naming an unknown one."""
    bad = sorted(set(params) - set(PARAM_DEFAULTS))
    if bad:
        raise TypeError(f"unknown parameter(s) {bad}; valid: {', '.join(sorted(PARAM_DEFAULTS))}")
    return ({name: value for name, value in params.items() if name in OPTION_DEFAULTS},
            {name: value for name, value in params.items() if name not in OPTION_DEFAULTS})


class PairwiseSpec:
    """A pairwise loss with its scalar options checked: loss types, weights, β, ε and OPTION_DEFAULTS.

    pairwise_loss checks everything and evaluates in one call. A caller that evaluates one batch's
    loss part by part (prefops.PreferenceLoss: once per chunk of pairs, inside its forward) checks
    the batch's tensors once with check(), then calls losses() per part and metrics() once: neither
    checks anything or reads a value on the host, so the GPU never waits for them.
    """

    def __init__(self, loss_type="sigmoid", beta=0.1, label_smoothing=0.0, loss_weights=None, **options):
        self.loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        self.losses_by_name = {**LOSSES, **TOKEN_LEVEL_LOSSES}
        unknown = [name for name in self.loss_types if name not in self.losses_by_name]
        if unknown or not self.loss_types:
            raise ValueError(f"unknown loss_type {unknown or loss_type!r}; valid: "
                             f"{', '.join(sorted(self.losses_by_name))}")
        weights = [1.0] * len(self.loss_types) if loss_weights is None else [float(w) for w in loss_weights]
        if len(weights) != len(self.loss_types) or not all(math.isfinite(w) for w in weights):
            raise ValueError(f"loss_weights must be {len(self.loss_types)} finite numbers, one per loss_type; "
                             f"got {loss_weights!r}")
        options, tensors = split_params(options)
        if tensors:
            raise TypeError(f"{sorted(tensors)} are tensors of a batch: pass them to check(), losses() and metrics()")
        self.weights = weights
        self.options = {**OPTION_DEFAULTS, **options}
        _check_params(self.loss_types, beta, label_smoothing, self.options)
        self.beta, self.label_smoothing = float(beta), float(label_smoothing)

    def check(self, tensors: dict) -> list:
        """Check a batch's tensors (names as pairwise_loss's tensor arguments, absent or None when not
        given) without reading their values; return the checks of the values for
        prefops.checks.run_value_checks (one host read for all of them)."""
        check_sequence_shapes({name: tensors.get(name) for name in SEQUENCE_VALUES})
        if (tensors.get("ref_chosen_logps") is None) != (tensors.get("ref_rejected_logps") is None):
            missing = "ref_chosen_logps" if tensors.get("ref_chosen_logps") is None else "ref_rejected_logps"
            raise ValueError(f"{missing} is None but its counterpart is given: pass both reference log-probs or "
                             "neither")
        if tensors.get("pair_weights") is not None and any(t in ("aot", "aot_unpaired") for t in self.loss_types):
            raise ValueError("pair_weights cannot be used with 'aot' / 'aot_unpaired': those losses sort the pairs")
        probs = tensors.get("preference_probs")
        if probs is not None and self.label_smoothing:
            raise ValueError("pass either preference_probs (per pair) or label_smoothing (global), not both")
        if tensors.get("chosen_nll_logps") is None:
            if tensors.get("chosen_nll_lengths") is not None:
                raise ValueError("chosen_nll_lengths is given without chosen_nll_logps")
        elif not has_nll_term(self.loss_types, self.options):
            raise ValueError(f"chosen_nll_logps is given but no NLL term of loss_type {self.loss_types} reads it; "
                             "the NLL terms are 'sft', 'cpo' (cpo_alpha > 0) and 'orpo' (orpo_nll=True)")
        pairs = next((tensors[name].shape[0] for name in SEQUENCE_VALUES if tensors.get(name) is not None), None)
        weights = self.options["modpo_weights"]
        for name in ("chosen_margin_rewards", "rejected_margin_rewards"):
            margin = tensors.get(name)
            if margin is None:
                continue
            if margin.dim() not in (1, 2) or margin.shape[0] != pairs:
                raise ValueError(f"{name} must have shape [P] or [P, K] with P = {pairs}; got {tuple(margin.shape)}")
            if weights is not None and (1 if margin.dim() == 1 else margin.shape[1]) != len(weights) - 1:
                raise ValueError(f"{name} must have one column per other objective, K = len(modpo_weights) - 1 = "
                                 f"{len(weights) - 1}; got shape {tuple(margin.shape)}")
        return [lengths_check(tensors.get("chosen_lengths"), "chosen_lengths"),
                lengths_check(tensors.get("rejected_lengths"), "rejected_lengths"),
                None if probs is None else ValueCheck(((probs < 0) | (probs > 1) | probs.isnan()).any(),
                                                      _raise_probs_range),
                lengths_check(tensors.get("chosen_nll_lengths"), "chosen_nll_lengths")]

    def batch(self, tensors: dict) -> PairBatch:
        """The checked tensors of a batch (or of some of its pairs) in the compute dtype, unchecked."""
        dtype = compute_dtype(*(tensors.get(name) for name in ("chosen_logps", "rejected_logps", "ref_chosen_logps",
                                                                "ref_rejected_logps")))
        values = {name: value.to(dtype) if name in SEQUENCE_VALUES and value is not None else value
                  for name, value in tensors.items()}
        return PairBatch(values, self.beta, self.label_smoothing, self.options)

    def losses(self, batch: PairBatch) -> torch.Tensor:
        """Per-pair loss [P], Σ_i w_i · loss_i (times pair_weights, without gradient)."""
        total = None
        for name, weight in zip(self.loss_types, self.weights):
            try:
                part = self.losses_by_name[name](batch)
            except _MissingInput as missing:
                raise ValueError(f"loss_type {name!r} needs {missing.argument}, which was not given") from None
            part = part if weight == 1 else weight * part
            total = part if total is None else total + part
        pair_weights = batch.values.get("pair_weights")
        return total if pair_weights is None else total * pair_weights.detach()

    def metrics(self, batch: PairBatch) -> dict:
        """TRL-named metrics (detached scalars, means over pairs)."""
        try:
            return _metrics(batch, self.loss_types)
        except _MissingInput as missing:  # only a reference-free reward can be missing an input here
            raise ValueError(f"loss_type {self.loss_types[0]!r} needs {missing.argument}") from None


def _raise_probs_range():
    raise ValueError("preference_probs must lie in [0, 1]")


def pairwise_loss(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                  loss_type="sigmoid", beta=0.1, label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None,
                  loss_weights=None, **params):
    """Per-pair preference loss [P] and TRL-named metrics from sequence log-prob sums.

    loss_type: a name in LOSSES or a list of names; with loss_weights (default all 1)
    the loss is Σ_i w_i · loss_i, as TRL's DPOConfig. chosen_lengths / rejected_lengths
    count the completion tokens (needed by ipo, sigmoid_norm, sft, simpo, alphapo, orpo
    and cpo's NLL). Other parameters, with defaults, are in PARAM_DEFAULTS:
    discopop_tau, f_divergence_type, f_alpha_divergence_coef, simpo_gamma or
    gamma_beta_ratio, cpo_alpha, orpo_nll, alpha (AlphaPO), dpop_lambda, preference_probs
    (soft labels [P]), pair_weights ([P], e.g. WPO weights, multiplied in without
    gradient), chosen_margin_rewards / rejected_margin_rewards / modpo_weights (MODPO),
    chosen_seq_kl / rejected_seq_kl / tdpo_alpha (TDPO: 'tdpo1', 'tdpo2', in TOKEN_LEVEL_LOSSES),
    chosen_nll_logps / chosen_nll_lengths ([P]: the NLL term of sft, cpo and orpo on other
    targets than chosen_logps, e.g. prompt and completion as TRL's ORPO; nll_mean_length, when
    given, must then count those tokens). Reference-free losses (REFERENCE_FREE) take no ref_*_logps.
    Every check runs here, with one host read of the values it checks (PairwiseSpec says how to
    check once and evaluate many times).

    Returns (losses [P] in fp32, fp64 for fp64 inputs; metrics: dict of detached
    scalars, means over pairs). The batch loss is losses.mean().
    """
    options, tensors = split_params(params)
    spec = PairwiseSpec(loss_type, beta, label_smoothing, loss_weights, **options)
    tensors.update(chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
                   ref_rejected_logps=ref_rejected_logps, chosen_lengths=chosen_lengths,
                   rejected_lengths=rejected_lengths)
    for name in ("chosen_logps", "rejected_logps"):
        if tensors[name] is None:
            raise ValueError(f"{name} is required")
    run_value_checks(spec.check(tensors))
    batch = spec.batch(tensors)
    return spec.losses(batch), spec.metrics(batch)
