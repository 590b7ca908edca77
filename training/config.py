"""The training configuration: one flat dataclass, loaded from YAML plus `--key value` overrides.

Flat on purpose: every knob is one line in configs/default.yaml and one
`--key value` on the command line. Unknown keys fail loudly, listing the valid
ones, because a misspelt key silently ignored is a wasted run. Each key's
one-line meaning sits next to it (`knob(default, meaning)`) and is what
`prefops train --help` lists. A bad value is reported where it came from: the
YAML file and line, or the `--key value` given on the command line.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from importlib import resources
from pathlib import Path

import yaml


def knob(default, meaning: str):
    """A config key with its default and the one-line meaning `prefops train --help` shows."""
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": meaning})
    return dataclasses.field(default=default, metadata={"help": meaning})


@dataclasses.dataclass
class Config:
    # Model: "tiny-llama" builds a small Llama from LlamaConfig(**model_config) with the
    # bundled character tokenizer; anything else is an AutoModelForCausalLM name or path.
    model: str = knob("tiny-llama", "tiny-llama, or a Hugging Face causal LM name or path")
    model_config: dict = knob({}, "LlamaConfig fields of tiny-llama, or from_pretrained kwargs")
    attn_implementation: str | None = knob(
        None, "prefops | sdpa | eager | flex_attention | flash_attention_2 (null: prefops when packing or "
        "shared_prompt, else sdpa)")

    # Data: "synthetic:addition", a .jsonl path, or "hf:NAME[:SPLIT]" (needs `datasets`).
    data: str = knob("synthetic:addition", "synthetic:addition, a .jsonl path, or hf:NAME[:SPLIT]")
    eval_data: str | None = knob(None, "held-out preference data (null: hold out eval_fraction of data)")
    eval_fraction: float = knob(0.05, "fraction of data held out for evaluation (SFT always holds out)")
    sft_data: str | None = knob(None, "SFT data (null: the chosen completions of data)")
    synthetic_size: int = knob(4000, "rows generated per synthetic source")
    max_length: int = knob(64, "tokens per sequence, prompt + completion (longer rows are truncated)")
    append_eos: bool = knob(True, "end every completion with the tokenizer's EOS token")
    packing: bool = knob(False, "padding-free batches (flat tokens + cu_seqlens)")
    shared_prompt: bool = knob(False, "run each prompt once, then its completions (prefops.shared_prompt)")
    list_size: int = knob(4, "completions per ranked row of a synthetic task (listwise, curriculum)")

    # Objective. A pairwise loss of prefops.losses (TRL names: sigmoid, ipo, simpo, ...), a list of them
    # summed with loss_weights (["sigmoid", "sft"] with [1, alpha] is RPO), or an unpaired loss
    # (kto, apo_zero_unpaired, bco) trained on prompt/completion/label rows or on unpaired pairs,
    # or a listwise loss (plackett_luce, lipo_lambda, pro, adpo, list_ce, dcg_pairwise, all_pairs) on ranked rows.
    loss_type: str | list = knob("sigmoid", "pairwise (sigmoid = DPO, ipo, ...), a list of them, unpaired or listwise")
    loss_weights: list | None = knob(None, "weights of a list of loss types ([1, 0.2] with [sigmoid, sft] is RPO)")
    beta: float = knob(0.1, "DPO's beta: scale of the implicit reward; larger keeps closer to the reference")
    label_smoothing: float = knob(0.0, "assumed fraction of flipped preference labels (cDPO)")
    kl_direction: str = knob("ref_policy", "per-token KL of tdpo1/tdpo2: ref_policy (TDPO's) | policy_ref")
    ld_alpha: float | None = knob(None, "LD-DPO: weight of the tokens beyond the shorter response (padded only)")
    wpo: bool = knob(False, "WPO: weight each pair by how on-policy it is")
    desirable_weight: float = knob(1.0, "KTO's lambda_D: weight of desirable completions")
    undesirable_weight: float = knob(1.0, "KTO's lambda_U: weight of undesirable completions")
    loss_params: dict = knob({}, "other loss parameters (PARAM_DEFAULTS, LISTWISE_PARAM_DEFAULTS keys)")
    curriculum: str | int = knob("none", "Curry-DPO on ranked rows: none | rank (a stage per rank gap) | n stages")
    reference: str = knob("auto", "model | precomputed | none | auto (none for reference-free losses)")
    reference_update: str = knob("never", "never | round (online: the policy at each round's start) | stage "
                                 "(curriculum: the policy at each stage's start, Curry-DPO)")
    loss_impl: str = knob("fused", "fused | reference (materialises the logits, for checking)")
    strategy: str | None = knob(None, "auto | budget | sliced | lean (null: prefops.configure's default, auto)")
    budget: str | int | None = knob(None, "the budget strategy's logits budget, e.g. 1GB")

    # Online preference learning: a non-empty section trains on the policy's own samples, round after
    # round (training/online.py); its keys and defaults are ONLINE_KEYS.
    online: dict = knob({}, "online rounds: sample, judge, pair, train (keys: ONLINE_KEYS; {}: offline)")
    # OFS-DPO: a non-empty section trains a fast and a slow LoRA adapter over the frozen model, each on the
    # pairwise loss, plus a regulariser between them (training/ofs.py); its keys and defaults are OFS_KEYS.
    ofs_dpo: dict = knob({}, "OFS-DPO's fast and slow LoRA adapters (keys: OFS_KEYS; {}: off)")

    # Optimisation. Examples per optimizer step = micro_batch_size * grad_accum_steps * processes (torchrun).
    sft_steps: int = knob(0, "optimizer steps of the SFT stage (0: no SFT)")
    sft_lr: float = knob(1e-3, "peak learning rate of the SFT stage")
    steps: int = knob(100, "optimizer steps of the preference stage")
    lr: float = knob(1e-4, "peak learning rate of the preference stage")
    warmup_steps: int = knob(10, "linear warmup steps of each stage")
    lr_schedule: str = knob("cosine", "cosine | linear | constant (after warmup)")
    min_lr_ratio: float = knob(0.1, "final learning rate as a fraction of the peak")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    adam_betas: list = knob([0.9, 0.95], "AdamW betas")
    grad_clip: float = knob(1.0, "gradient-norm clipping (0: none)")
    micro_batch_size: int = knob(8, "pairs, lists or completions per forward pass and process")
    grad_accum_steps: int = knob(1, "micro-batches per optimizer step")
    seed: int = knob(0, "seed of the model's initialisation, the data and the sampling")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    threads: int | None = knob(None, "CPU threads of torch (null: torch's default)")
    bf16: str = knob("auto", "auto (on when CUDA supports it) | true | false")
    gradient_checkpointing: bool = knob(False, "recompute each layer in backward to save memory")
    activation_offload: bool = knob(False, "keep the activations saved for backward in CPU memory (pinned on CUDA)")
    context_parallel: int = knob(1, "ranks that share each packed micro-batch's tokens (under torchrun; 1: off)")
    data_parallel: str = knob("fsdp", "under torchrun: fsdp (FSDP2 shards parameters, gradients and optimizer "
                              "state) | ddp (DistributedDataParallel: a whole copy per rank, gradients all-reduced)")
    tensor_parallel: int = knob(1, "ranks that split every weight (transformers' tp_plan auto: the lm_head along the "
                                   "vocabulary) and run the same batches: torchrun with exactly this many processes "
                                   "(1: off)")

    # Evaluation, logging and checkpoints.
    eval_every: int = knob(50, "steps between evaluations on the held-out split")
    eval_batches: int = knob(8, "micro-batches per evaluation")
    win_rate_samples: int = knob(256, "completions sampled and judged by a synthetic task's scorer")
    sample_temperature: float = knob(1.0, "temperature of those samples")
    log_every: int = knob(10, "steps between log lines")
    out_dir: str = knob("runs/default", "where the log, curves.png and checkpoints go")
    checkpoint_every: int = knob(100, "steps between checkpoints (out_dir/last.pt)")
    resume: bool = knob(False, "continue from out_dir/last.pt")
    ref_cache_dir: str = knob("runs/ref_cache", "cache of precomputed reference log-probs")
    plot: bool = knob(True, "write out_dir/curves.png at the end")
    tensorboard: bool = knob(True, "TensorBoard logs in out_dir (when tensorboard is installed)")

    @property
    def batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps


# The online section's keys: (default, meaning). steps and lr do not apply online: the run takes
# rounds * steps_per_round steps at the preference stage's lr.
ONLINE_KEYS = {
    "rounds": (4, "rounds of sample -> judge -> pair -> train"),
    "prompts_per_round": (128, "prompts sampled each round"),
    "samples_per_prompt": (4, "completions sampled per prompt (K)"),
    "steps_per_round": (50, "optimizer steps on each round's pairs"),
    "max_new_tokens": (None, "generated tokens per completion (null: the task's answer length, else 64)"),
    "temperature": (1.0, "sampling temperature"),
    "top_p": (1.0, "nucleus sampling threshold"),
    "sample_batch_size": (64, "prompts per sampling batch (one seed, one rank); generate() runs as many sequences"),
    "mixture_alpha": (0.0, "sample from the geometric mixture (1-a) z_policy + a z_ref (IPO-MD / Nash-MD)"),
    "judge": ("task", "task | self (the policy judges its own samples, OSP) | module:function | reward_model:PATH | "
                      "pairwise:module:function, or a list of all scalar or all pairwise ones (an ensemble: their "
                      "mean; their spread feeds uncertainty_z)"),
    "self_judge_template": ("{prompt}\nA: {a}\nB: {b}\nBetter: ", "judge self: the comparison prompt, with "
                                                                   "{prompt}, {a} and {b}"),
    "self_judge_answers": (["A", "B"], "judge self: the one-token answers naming the first and the second response"),
    "judge_repeats": (1, "judge each sample (pairwise: each pair) this many times; the spread feeds the "
                         "uncertainty filter"),
    "pairs": ("best_worst", "best_worst | all_pairs | margin | ranked (lists, for listwise losses) | responses "
                            "(lists with per-response targets, for sppo_response, gpo, spo)"),
    "min_margin": (0.0, "pairs=margin: the least score gap of a pair"),
    "soft_labels": (False, "preference_prob from the judge (pairwise) or sigmoid(gap / soft_label_scale)"),
    "soft_label_scale": (1.0, "the score gap that makes a soft label sigmoid(1)"),
    "uncertainty_z": (None, "drop pairs whose gap is within z spreads of the judge's uncertainty (null: keep); "
                            "pairwise: P(a > b) within z standard errors of 1/2"),
    "uncertainty_weighting": (False, "weight each pair's loss by the judge's certainty erf(d / (sqrt(2) u)), "
                                     "d its gap (pairwise: P(a > b) - 1/2), u its uncertainty (UPO)"),
    "teacher": (None, "DNO: a local causal-LM directory (the policy's vocabulary) whose samples join each prompt's"),
    "teacher_samples": (1, "DNO: teacher completions added per prompt"),
    "gold": (None, "DNO: reference completions joining each prompt's samples: a .jsonl of prompt/completion rows, "
                   "or task (the synthetic task's answer)"),
    "tree_depth": (0, "MCTS-DPO step-level pairs: steps per path of each prompt's tree (0: off, whole samples)"),
    "tree_branching": (2, "MCTS-DPO: next steps sampled at each node"),
    "step_boundary": ("\n", "MCTS-DPO: the one-token text that ends a step (null: steps of step_max_tokens tokens)"),
    "step_max_tokens": (32, "MCTS-DPO: the most tokens of one step"),
    "apo_alpha": (0.0, "APO: reference log pi_t + a (log pi_t - log pi_t-1) (needs reference_update: round)"),
    "prompts": (None, "prompts to sample for: a .jsonl of rows with a prompt (null: the synthetic task's)"),
    "eval_prompts": (128, "prompts of the win rates against the start and the previous round"),
}
PAIR_MODES = ("best_worst", "all_pairs", "margin", "ranked", "responses")

# The ofs_dpo section's keys: (default, meaning). The fast adapter trains at the stage's lr and schedule.
OFS_KEYS = {
    "rank": (8, "LoRA rank of each adapter"),
    "alpha": (16, "LoRA alpha: each adapter's update is scaled by alpha / rank"),
    "target_modules": (None, "module names that get the adapters, or all-linear (null: peft's default for the model)"),
    "lr_ratio": (2.0, "the fast adapter's learning rate over the slow one's (> 1)"),
    "reg_weight": (1.0, "weight of the regulariser -log sigmoid(beta (margin_fast - margin_slow)) in the fast loss"),
    "swap": (True, "after a step whose loss of the slow adapter is below the fast one's, the two swap weights"),
    "domains": (None, "COFS-DPO: data sources trained one after another (>= 2); the policy's fast adapter is then "
                      "the linear combination of each domain's fast module"),
    "combine_weights": (None, "COFS-DPO: the combination's weight of each domain (>= 0, summing to 1; null: equal)"),
}

UNPAIRED_LOSSES = ("kto", "apo_zero_unpaired", "bco")
# Pairwise losses whose loss of a pair depends on the other pairs of its batch.
BATCH_COUPLED_LOSSES = ("aot", "aot_unpaired")

CHOICES = {
    "data_parallel": ("fsdp", "ddp"),
    "reference": ("auto", "model", "precomputed", "none"),
    "reference_update": ("never", "round", "stage"),
    "loss_impl": ("fused", "reference"),
    "strategy": (None, "auto", "budget", "sliced", "lean"),
    "kl_direction": ("ref_policy", "policy_ref"),
    "lr_schedule": ("cosine", "linear", "constant"),
    "bf16": ("auto", True, False),
    "attn_implementation": (None, "prefops", "sdpa", "eager", "flex_attention", "flash_attention_2",
                            "flash_attention_3"),
}

# Keys that only change what is observed, not the trajectory: a run may resume with other values.
RESUME_FREE_KEYS = frozenset({
    "eval_every", "eval_batches", "win_rate_samples", "log_every", "out_dir", "checkpoint_every",
    "resume", "ref_cache_dir", "plot", "tensorboard", "device", "threads", "sample_temperature",
    "activation_offload",  # where saved activations wait changes memory, not values
    # Every backend computes the same attention (tested against the masked float64 reference), so
    # a run saved with sdpa resumes under the prefops default.
    "attn_implementation",
    # How a micro-batch's tokens are shared by ranks changes no value (tests/test_context_parallel.py), and
    # the data order depends on the data-parallel ranks only: a run evaluates or resumes with another split.
    "context_parallel",
    # Both sum the same gradients over the ranks and checkpoint full (unsharded) state dicts.
    "data_parallel",
    # Nor does how the weights are split (tests/test_vocab_parallel_trainer.py).
    "tensor_parallel",
})


class ConfigError(ValueError):
    """A bad config value; `key` is the key it is about (None when it is about several)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def attention_implementation(config: Config) -> str:
    """The attention a model is built with: prefops (no T x T mask) for packed layouts unless one is named."""
    if config.attn_implementation is not None:
        return config.attn_implementation
    return "prefops" if config.packing or config.shared_prompt else "sdpa"


def valid_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def _typed(field: dataclasses.Field, value):
    """Check a value against its field's annotation; YAML reads 3e-3 as a string, so numbers are parsed."""
    kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,), "list": (list,)}
    allowed = tuple(kind for name in field.type.split("|") for kind in kinds.get(name.strip(), ()))
    if value is None and "None" in field.type or field.name in CHOICES:
        return value
    if isinstance(value, str) and float in allowed:
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        raise ConfigError(f"{field.name} must be of type {field.type}; got {value!r}", field.name)
    return value


def from_dict(values: dict) -> Config:
    fields = {field.name: field for field in dataclasses.fields(Config)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}", unknown[0])
    config = Config(**{key: _typed(fields[key], value) for key, value in values.items()})
    validate(config)
    return config


def validate(config: Config) -> None:
    for key, allowed in CHOICES.items():
        if getattr(config, key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got {getattr(config, key)!r}", key)
    for key in ("micro_batch_size", "grad_accum_steps", "max_length", "steps", "context_parallel", "tensor_parallel"):
        if not isinstance(getattr(config, key), int) or getattr(config, key) < 1:
            raise ConfigError(f"{key} must be a positive integer; got {getattr(config, key)!r}", key)
    if config.tensor_parallel > 1:
        for clash, why in (("context_parallel", config.context_parallel > 1), ("online", bool(config.online)),
                           ("ofs_dpo", bool(config.ofs_dpo)), ("loss_impl", config.loss_impl != "fused")):
            if why:
                raise ConfigError(f"tensor_parallel runs the fused loss of one data-parallel rank, without "
                                  f"context_parallel, online rounds or ofs_dpo: unset {clash} (got "
                                  f"{getattr(config, clash)!r})", "tensor_parallel")
    if config.context_parallel > 1 and not (config.packing or config.shared_prompt):
        raise ConfigError("context_parallel cuts each micro-batch's flat token stream between ranks: set packing: "
                          "true (or shared_prompt: true)", "context_parallel")
    if config.context_parallel > 1 and attention_implementation(config) != "prefops":
        raise ConfigError(f"context_parallel needs attn_implementation prefops (null picks it), whose attention "
                          f"gathers the other ranks' keys; got {config.attn_implementation!r}", "context_parallel")
    if config.context_parallel > 1 and config.online:
        raise ConfigError("context_parallel shares the training batches of a group's ranks, which online rounds "
                          "would have each rank sample on its own: train online without context_parallel",
                          "context_parallel")
    if not 0 <= config.eval_fraction < 1:
        raise ConfigError(f"eval_fraction must lie in [0, 1); got {config.eval_fraction}", "eval_fraction")
    _validate_objective(config)
    _validate_online(config)
    _validate_ofs(config)


def _section_options(values: dict, keys: dict) -> dict:
    return {key: values.get(key, default) for key, (default, _) in keys.items()}


def online_options(config: Config) -> dict:
    """The online section with its defaults filled in."""
    return _section_options(config.online, ONLINE_KEYS)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(low: int):
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= low


def _section_checker(config: Config, name: str, keys: dict):
    """A dict section's options, after refusing unknown keys, and require(key, ok, allowed), which names
    `name.key` and the allowed values when ok(value) fails."""
    values = getattr(config, name)
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]} is not an {name} key; valid: {', '.join(keys)}", name)
    options = _section_options(values, keys)

    def require(key, ok, allowed):
        if not ok(options[key]):
            raise ConfigError(f"{name}.{key} must be {allowed}; got {options[key]!r}", name)
    return options, require


def _validate_online(config: Config) -> None:
    if config.reference_update == "stage" and config.curriculum == "none":
        raise ConfigError("reference_update: stage refreshes the reference at each curriculum stage: set "
                          "curriculum (rank or a number of stages), or reference_update: never", "reference_update")
    reference_free = config.reference == "none" or config.reference == "auto" and not needs_reference(config)
    if config.reference_update == "stage" and reference_free:
        raise ConfigError(f"reference_update: stage refreshes the reference, which loss_type {config.loss_type!r} "
                          f"with reference {config.reference} does not read: set reference_update: never",
                          "reference_update")
    if not config.online:
        if config.reference_update == "round":
            raise ConfigError("reference_update: round refreshes the reference each online round: add an online "
                              "section, or use never (or stage with a curriculum)", "reference_update")
        return
    options, require = _section_checker(config, "online", ONLINE_KEYS)
    whole, number = _whole, _number
    for key in ("rounds", "prompts_per_round", "steps_per_round", "sample_batch_size", "judge_repeats", "eval_prompts"):
        require(key, whole(1), "a positive integer")
    require("samples_per_prompt", whole(2), "an integer >= 2 (a pair needs two samples)")
    require("max_new_tokens", lambda v: v is None or whole(1)(v), "a positive integer or null")
    require("temperature", lambda v: number(v) and v > 0, "a number > 0")
    require("top_p", lambda v: number(v) and 0 < v <= 1, "a number in (0, 1]")
    require("mixture_alpha", lambda v: number(v) and 0 <= v <= 1, "a number in [0, 1]")
    require("apo_alpha", lambda v: number(v) and v >= 0, "a number >= 0")
    require("min_margin", lambda v: number(v) and v >= 0, "a number >= 0")
    require("soft_label_scale", lambda v: number(v) and v > 0, "a number > 0")
    require("uncertainty_z", lambda v: v is None or number(v) and v >= 0, "a number >= 0 or null")
    for key in ("soft_labels", "uncertainty_weighting"):
        require(key, lambda v: isinstance(v, bool), "true or false")
    require("pairs", lambda v: v in PAIR_MODES, "one of " + ", ".join(PAIR_MODES))
    spec = lambda v: isinstance(v, str) and v  # noqa: E731
    require("judge", lambda v: spec(v) or isinstance(v, list) and len(v) >= 2 and all(map(spec, v)),
            "task, module:function, reward_model:PATH, pairwise:module:function or a list of >= 2 of them")
    require("prompts", lambda v: v is None or isinstance(v, str), "a .jsonl path or null")
    require("tree_depth", whole(0), "an integer >= 0 (0: no step tree)")
    require("tree_branching", whole(2), "an integer >= 2 (siblings to pair)")
    require("step_boundary", lambda v: v is None or isinstance(v, str) and v, "a non-empty string or null")
    require("step_max_tokens", whole(1), "a positive integer")
    if options["tree_depth"]:
        tree_refuses = [(is_unpaired(config) or is_listwise(config), f"loss_type {config.loss_type!r}: step pairs "
                         "train a pairwise loss"), (options["pairs"] != "best_worst", "pairs: step pairs are each "
                         "node's best against its worst child (pairs: best_worst)"),
                        (options["soft_labels"] or options["uncertainty_z"] is not None
                         or options["uncertainty_weighting"], "soft_labels and the uncertainty keys: they act on "
                         "judged pairs of whole samples"), (options["mixture_alpha"], "mixture_alpha"),
                        (options["teacher"] is not None or options["gold"] is not None, "teacher and gold")]
        for refused, what in tree_refuses:
            if refused:
                raise ConfigError(f"online.tree_depth (MCTS-DPO step pairs) cannot take {what}", "online")
    require("teacher", lambda v: v is None or isinstance(v, str) and v, "a model directory or null")
    require("teacher_samples", whole(1), "a positive integer")
    require("gold", lambda v: v is None or isinstance(v, str) and v, "task, a .jsonl path or null")
    require("self_judge_template", lambda v: isinstance(v, str) and all(f in v for f in ("{prompt}", "{a}", "{b}")),
            "a string holding {prompt}, {a} and {b}")
    require("self_judge_answers", lambda v: isinstance(v, list) and len(v) == 2 and len(set(v)) == 2
            and all(isinstance(a, str) and a for a in v), "two different non-empty strings (one token each)")
    ensemble = isinstance(options["judge"], list)
    if ensemble and "self" in options["judge"]:
        raise ConfigError("online.judge self judges alone: an ensemble averages independent judges", "online")
    if "task" in (options["judge"] if ensemble else [options["judge"]]) or options["prompts"] is None:
        if not config.data.startswith("synthetic:"):
            raise ConfigError("online: judge task and prompts null need a synthetic task as data (synthetic:sort); "
                              "otherwise name online.prompts and online.judge", "online")
    wanted = "responses" if is_self_play(config) else "ranked" if is_listwise(config) else None
    if wanted != (options["pairs"] if options["pairs"] in ("ranked", "responses") else None):
        raise ConfigError(f"online.pairs {options['pairs']!r} with loss_type {config.loss_type!r}: the self-play "
                          "losses (sppo_response, gpo, spo) train on lists with per-response targets (pairs: "
                          "responses), the other listwise losses on ranked lists (pairs: ranked), the others on "
                          "pairs", "online")
    if config.loss_type == "gpo" and not all(spec.startswith("pairwise:") or spec == "self"
                                             for spec in (options["judge"] if ensemble else [options["judge"]])):
        raise ConfigError(f"loss_type gpo regresses onto mean logits of P(a > b): online.judge must be pairwise "
                          f"(pairwise:module:function, or a list of them); got {options['judge']!r}", "online")
    if options["soft_labels"] and (is_unpaired(config) or is_listwise(config)):
        raise ConfigError(f"online.soft_labels gives pairs a preference_prob; loss_type {config.loss_type!r} is "
                          f"{'unpaired' if is_unpaired(config) else 'listwise'}", "online")
    if options["apo_alpha"] and config.reference_update != "round":
        raise ConfigError("online.apo_alpha extrapolates from the last two rounds' references: set "
                          "reference_update: round", "online")
    uncertain = [key for key, on in (("uncertainty_z", options["uncertainty_z"] is not None),
                                      ("uncertainty_weighting", options["uncertainty_weighting"])) if on]
    for key in uncertain:
        if options["judge_repeats"] < 2 and not ensemble:
            # One judgement per sample, or per pair for a pairwise judge, has no spread to filter or weight by.
            raise ConfigError(f"online.{key} needs the judge's spread: set judge_repeats >= 2 or make judge a "
                              "list (an ensemble)", "online")
        if is_listwise(config):
            raise ConfigError(f"online.{key} acts on pairs; loss_type {config.loss_type!r} trains on ranked lists: "
                              f"unset online.{key}", "online")
    if options["uncertainty_weighting"]:
        coupled = set(loss_types(config)) & set(BATCH_COUPLED_LOSSES)
        for refuses, reason in ((config.wpo, "wpo sets its own"), (is_unpaired(config), "an unpaired loss has none"),
                                (coupled, "a loss that sorts a batch's pairs takes none")):
            if refuses:
                raise ConfigError(f"online.uncertainty_weighting gives each pair a loss weight, which {reason} "
                                  f"(loss_type {config.loss_type!r}, wpo {config.wpo}): set it to false", "online")
    if config.curriculum != "none" or config.reference == "precomputed":
        raise ConfigError("online rounds sample new pairs each round: set curriculum: none and reference to "
                          "model, none or auto", "online")


def ofs_options(config: Config) -> dict:
    """The ofs_dpo section with its defaults filled in."""
    return _section_options(config.ofs_dpo, OFS_KEYS)


def _validate_ofs(config: Config) -> None:
    if not config.ofs_dpo:
        return
    _, require = _section_checker(config, "ofs_dpo", OFS_KEYS)
    number = _number
    require("rank", _whole(1), "a positive integer")
    require("alpha", lambda v: number(v) and v > 0, "a number > 0")
    require("lr_ratio", lambda v: number(v) and v > 1, "a number > 1 (the fast adapter learns faster)")
    require("reg_weight", lambda v: number(v) and v >= 0, "a number >= 0")
    require("swap", lambda v: isinstance(v, bool), "true or false")
    require("target_modules", lambda v: v is None or v == "all-linear" or (
        isinstance(v, list) and v and all(isinstance(name, str) and name for name in v)),
        "a list of module names, all-linear or null")
    if is_unpaired(config) or is_listwise(config):
        raise ConfigError(f"ofs_dpo trains each adapter on a pairwise loss; loss_type {config.loss_type!r} is "
                          f"{'unpaired' if is_unpaired(config) else 'listwise'}", "ofs_dpo")
    if config.reference_update != "never":
        raise ConfigError("ofs_dpo's reference is the frozen model under the adapters (adapters off), never refreshed: "
                          f"set reference_update: never; got {config.reference_update!r}", "ofs_dpo")
    if config.online and online_options(config)["mixture_alpha"]:
        raise ConfigError("ofs_dpo samples from the fast adapter alone: set online.mixture_alpha: 0", "ofs_dpo")
    options = ofs_options(config)
    domains, weights = options["domains"], options["combine_weights"]
    require("domains", lambda v: v is None or isinstance(v, list) and len(v) >= 2
            and all(isinstance(source, str) and source for source in v), "a list of >= 2 data sources or null")
    require("combine_weights", lambda v: v is None or isinstance(v, list) and all(number(w) and w >= 0 for w in v)
            and abs(sum(v) - 1) <= 1e-6, "a list of numbers >= 0 summing to 1, or null")
    if domains is None and weights is not None:
        raise ConfigError("ofs_dpo.combine_weights weighs the modules of ofs_dpo.domains: set domains", "ofs_dpo")
    if domains is not None:
        if weights is not None and len(weights) != len(domains):
            raise ConfigError(f"ofs_dpo.combine_weights needs one weight per domain ({len(domains)}); got "
                              f"{len(weights)}", "ofs_dpo")
        if config.online or config.resume:
            raise ConfigError("ofs_dpo.domains (COFS-DPO) trains offline domain after domain in one run: unset "
                              f"{'online' if config.online else 'resume'}", "ofs_dpo")
        if config.eval_data:
            raise ConfigError("ofs_dpo.domains holds out each domain's own eval split (eval_fraction): unset "
                              "eval_data", "ofs_dpo")


def loss_types(config: Config) -> list[str]:
    return [config.loss_type] if isinstance(config.loss_type, str) else list(config.loss_type)


def is_token_level(config: Config) -> bool:
    from prefops.losses.pairwise import TOKEN_LEVEL_LOSSES
    return any(name in TOKEN_LEVEL_LOSSES for name in loss_types(config))


def is_unpaired(config: Config) -> bool:
    return any(name in UNPAIRED_LOSSES for name in loss_types(config))


def is_listwise(config: Config) -> bool:
    from prefops.losses.listwise import LISTWISE_LOSSES
    return any(name in LISTWISE_LOSSES for name in loss_types(config))


def is_self_play(config: Config) -> bool:
    """The listwise losses with a per-response target (prefops.losses.self_play)."""
    from prefops.losses import SELF_PLAY_LOSSES
    return any(name in SELF_PLAY_LOSSES for name in loss_types(config))


def uses_ranked_rows(config: Config) -> bool:
    """Whether the preference stage keeps whole ranked lists (listwise losses, curriculum pairs)."""
    return is_listwise(config) or config.curriculum != "none"


def needs_reference(config: Config) -> bool:
    from prefops.losses import REFERENCE_FREE
    from prefops.losses.listwise import LISTWISE_PARAM_DEFAULTS, _needs_reference
    if is_listwise(config):
        return _needs_reference(config.loss_type, {**LISTWISE_PARAM_DEFAULTS, **config.loss_params})
    return any(name not in REFERENCE_FREE for name in loss_types(config))


def _validate_objective(config: Config) -> None:
    from prefops.losses import LOSSES  # the registry is the source of truth for pairwise names
    from prefops.losses.listwise import LISTWISE_LOSSES
    from prefops.losses.pairwise import TOKEN_LEVEL_LOSSES

    names = loss_types(config)
    pairwise = sorted({**LOSSES, **TOKEN_LEVEL_LOSSES})
    token_level = [name for name in names if name in TOKEN_LEVEL_LOSSES]
    if token_level and config.reference not in ("auto", "model"):
        raise ValueError(f"loss_type {token_level[0]!r} needs the reference model's whole next-token distributions: "
                         f"set reference to model (or auto); got {config.reference!r}")
    if token_level and (config.ld_alpha is not None or config.wpo):
        raise ValueError(f"loss_type {token_level[0]!r} cannot be combined with ld_alpha or wpo")
    unknown = [name for name in names
               if name not in pairwise and name not in UNPAIRED_LOSSES and name not in LISTWISE_LOSSES]
    if unknown or not names:
        raise ValueError(f"loss_type {unknown or config.loss_type!r} is unknown; valid: pairwise "
                         f"{', '.join(pairwise)} (or a list of them); unpaired {', '.join(UNPAIRED_LOSSES)}; "
                         f"listwise {', '.join(LISTWISE_LOSSES)}")
    for family, members, extra in (("an unpaired", UNPAIRED_LOSSES, {"loss_params": {}}),
                                   ("a listwise", tuple(LISTWISE_LOSSES), {})):
        if not any(name in members for name in names):
            continue
        if len(names) > 1:
            raise ValueError(f"{family} loss_type ({', '.join(members)}) cannot be combined in a list; "
                             f"got {config.loss_type!r}")
        pairwise_only = {"loss_weights": None, "ld_alpha": None, "wpo": False, "label_smoothing": 0.0, **extra}
        hint = " (all_pairs and dcg_pairwise take pairwise options in loss_params)" if extra == {} else ""
        for key, default in pairwise_only.items():
            if getattr(config, key) != default:
                raise ValueError(f"{key} applies to pairwise losses only; loss_type {names[0]!r} is "
                                 f"{family.split()[1]}{hint}")
        if config.reference == "none" and needs_reference(config):
            raise ValueError(f"loss_type {names[0]!r} needs a reference: set reference to model or precomputed")
    curriculum = config.curriculum
    if curriculum != "none":
        if curriculum != "rank" and (isinstance(curriculum, bool) or not isinstance(curriculum, int) or curriculum < 1):
            raise ConfigError(f"curriculum must be none, rank or a number of stages >= 1; got {curriculum!r}",
                              "curriculum")
        if is_unpaired(config) or is_listwise(config):
            raise ValueError(f"curriculum turns ranked lists into pairs for a pairwise loss; loss_type "
                             f"{names[0]!r} is {'unpaired' if is_unpaired(config) else 'listwise'}")
    if not isinstance(config.list_size, int) or config.list_size < 2:
        raise ConfigError(f"list_size must be an integer >= 2; got {config.list_size!r}", "list_size")
    if config.shared_prompt:
        if is_unpaired(config):
            raise ValueError(f"shared_prompt packs a prompt's pair or list; loss_type {names[0]!r} is unpaired")
        if config.ld_alpha is not None:
            raise ValueError("ld_alpha needs padded batches (it pairs chosen and rejected tokens): "
                             "set shared_prompt: false")
        if "flash" in (config.attn_implementation or ""):
            raise ValueError(f"shared_prompt needs an attention mask flash-attention's varlen kernels cannot "
                             f"express: set attn_implementation to prefops (which runs flash-attn per block when "
                             f"installed), sdpa, eager or flex_attention; got {config.attn_implementation!r}")
    coupled = [name for name in names if name in BATCH_COUPLED_LOSSES]
    if coupled and config.grad_accum_steps > 1:
        raise ValueError(f"loss_type {coupled[0]!r} couples the pairs of a batch (it sorts across them), so its loss "
                         "cannot be accumulated over micro-batches: set grad_accum_steps: 1")
    if config.ld_alpha is not None and config.packing:
        raise ValueError("ld_alpha needs padded batches (it pairs chosen and rejected tokens): set packing: false")


def default_path() -> Path:
    return Path(str(resources.files("prefops.training") / "configs" / "default.yaml"))


def parse_overrides(args: list[str]) -> dict:
    """Turn ['--steps', '10', '--model_config.hidden_size=64'] into {'steps': 10, 'model_config': {...}}.

    Values are parsed as YAML so numbers, booleans, lists and null keep their type.
    A dotted key sets one entry of a dict-valued key.
    """
    overrides: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got {arg!r}")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args):
            key, text = arg[2:], args[i + 1]
            i += 2
        else:
            raise ConfigError(f"{arg} needs a value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--{key} {text}: not a YAML value ({getattr(error, 'problem', error)})") from None
        key = key.replace("-", "_")
        if "." in key:
            outer, inner = key.split(".", 1)
            overrides.setdefault(outer, {})[inner] = value
        else:
            overrides[key] = value
    return overrides


def as_yaml(value) -> str:
    """A value as one line of YAML, the way it is written in a config or after --key."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=float("inf"))
    return text.strip().removesuffix("...").strip()  # a scalar document ends with "..."


def as_option(key: str, value) -> str:
    """An override as it is written on the command line: --key value (--outer.inner value for a dict)."""
    if isinstance(value, dict) and value:
        return " ".join(as_option(f"{key}.{inner}", item) for inner, item in value.items())
    return f"--{key} {as_yaml(value)}"


def read_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    """A YAML config's values and the line of each key; a ConfigError naming the file and line if it is bad."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    try:
        values = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(error, 'problem', None) or error}") from None
    if values is None:
        return {}, {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config must be a mapping of key: value; got a {type(values).__name__}")
    return values, {key.value: key.start_mark.line + 1 for key, _ in node.value}


def with_overrides(values: dict, overrides: dict) -> dict:
    """values with overrides applied; a dict-valued override (--outer.inner value) updates the dict."""
    merged = dict(values)
    for key, value in overrides.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if nested else value
    return merged


def load(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Read a YAML config (the bundled default when path is None) and apply overrides.

    A bad value raises a ConfigError that names where it came from: the override (--key value)
    when it is about an overridden key, else the file and line when the file alone is bad, else
    the overrides that made a valid file invalid.
    """
    path = default_path() if path is None else Path(path)
    values, lines = read_yaml(path)
    overrides = overrides or {}
    merged = with_overrides(values, overrides)
    try:
        return from_dict(merged)
    except (TypeError, ValueError) as error:
        key = getattr(error, "key", None)
        if key not in overrides:
            try:
                from_dict(values)
            except (TypeError, ValueError) as file_error:
                file_key = getattr(file_error, "key", None)
                where = f"{path}:{lines[file_key]}" if file_key in lines else str(path)
                raise ConfigError(f"{where}: {file_error}", file_key) from None
        given = [key] if key in overrides else list(overrides)
        raise ConfigError(f"{' '.join(as_option(k, overrides[k]) for k in given)}: {error}", key) from None


def key_help() -> list[tuple[str, object, object, str]]:
    """(key, its value in the default job, its built-in default, its meaning) for every key."""
    job, _ = read_yaml(default_path())
    builtin = to_dict(Config())
    return [(field.name, job.get(field.name, builtin[field.name]), builtin[field.name], field.metadata["help"])
            for field in dataclasses.fields(Config)]


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
