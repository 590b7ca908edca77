"""The training configuration: one flat dataclass, loaded from YAML plus `--key value` overrides.

Flat on purpose: every knob is one line in configs/default.yaml and one
`--key value` on the command line. Unknown keys fail loudly, listing the valid
ones, because a misspelt key silently ignored is a wasted run.
"""
from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import yaml


@dataclasses.dataclass
class Config:
    # Model: "tiny-llama" builds a small Llama from LlamaConfig(**model_config) with the
    # bundled character tokenizer; anything else is an AutoModelForCausalLM name or path.
    model: str = "tiny-llama"
    model_config: dict = dataclasses.field(default_factory=dict)
    attn_implementation: str = "sdpa"

    # Data: "synthetic:addition", a .jsonl path, or "hf:NAME[:SPLIT]" (needs `datasets`).
    data: str = "synthetic:addition"
    eval_data: str | None = None      # None: hold out eval_fraction of `data` (SFT always holds out)
    eval_fraction: float = 0.05
    sft_data: str | None = None       # None: SFT rows of `data` (the chosen completions of pairs)
    synthetic_size: int = 4000        # rows generated per synthetic source
    max_length: int = 64
    append_eos: bool = True           # end every completion with the tokenizer's EOS token
    packing: bool = False             # padding-free batches (flat tokens + cu_seqlens)
    shared_prompt: bool = False       # preference stage: each prompt once, then its completions (prefops.shared_prompt)
    list_size: int = 4                # completions per ranked row of a synthetic task (listwise, curriculum)

    # Objective. A pairwise loss of prefops.losses (TRL names: sigmoid, ipo, simpo, ...), a list of them
    # summed with loss_weights (["sigmoid", "sft"] with [1, alpha] is RPO), or an unpaired loss
    # (kto, apo_zero_unpaired, bco) trained on prompt/completion/label rows or on unpaired pairs,
    # or a listwise loss (plackett_luce, lipo_lambda, pro, adpo, list_ce, dcg_pairwise, all_pairs) on ranked rows.
    loss_type: str | list = "sigmoid"
    loss_weights: list | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    kl_direction: str = "ref_policy"  # tdpo1/tdpo2's per-token KL: ref_policy (TDPO's) | policy_ref
    ld_alpha: float | None = None     # LD-DPO: weight of the tokens beyond the shorter response (padded only)
    wpo: bool = False                 # WPO: weight each pair by how on-policy it is
    desirable_weight: float = 1.0     # KTO's lambda_D and lambda_U
    undesirable_weight: float = 1.0
    loss_params: dict = dataclasses.field(default_factory=dict)  # other PARAM_DEFAULTS / LISTWISE_PARAM_DEFAULTS keys
    curriculum: str | int = "none"    # Curry-DPO on ranked rows: none | rank (a stage per rank gap) | n stages
    reference: str = "auto"           # model | precomputed | none | auto (none for reference-free losses)
    loss_impl: str = "fused"          # fused | reference (materialises the logits)
    strategy: str | None = None       # lean | budget (fused loss; None: prefops.configure's default)
    budget: str | int | None = None   # the budget strategy's logits budget, e.g. "1GB"

    # Optimisation. Examples per optimizer step = micro_batch_size * grad_accum_steps * processes (torchrun).
    sft_steps: int = 0
    sft_lr: float = 1e-3
    steps: int = 100
    lr: float = 1e-4
    warmup_steps: int = 10
    lr_schedule: str = "cosine"       # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_betas: list = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    bf16: str = "auto"                # auto (on when CUDA supports it) | true | false
    gradient_checkpointing: bool = False

    # Evaluation, logging and checkpoints.
    eval_every: int = 50
    eval_batches: int = 8
    win_rate_samples: int = 256       # sampled completions judged by a synthetic task's scorer
    sample_temperature: float = 1.0
    log_every: int = 10
    out_dir: str = "runs/default"
    checkpoint_every: int = 100
    resume: bool = False              # continue from out_dir/last.pt
    ref_cache_dir: str = "runs/ref_cache"
    plot: bool = True
    tensorboard: bool = True          # used only when tensorboard is installed

    @property
    def batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps


UNPAIRED_LOSSES = ("kto", "apo_zero_unpaired", "bco")
# Pairwise losses whose loss of a pair depends on the other pairs of its batch.
BATCH_COUPLED_LOSSES = ("aot", "aot_unpaired")

CHOICES = {
    "reference": ("auto", "model", "precomputed", "none"),
    "loss_impl": ("fused", "reference"),
    "strategy": (None, "lean", "budget"),
    "kl_direction": ("ref_policy", "policy_ref"),
    "lr_schedule": ("cosine", "linear", "constant"),
    "bf16": ("auto", True, False),
}

# Keys that only change what is observed, not the trajectory: a run may resume with other values.
RESUME_FREE_KEYS = frozenset({
    "eval_every", "eval_batches", "win_rate_samples", "log_every", "out_dir", "checkpoint_every",
    "resume", "ref_cache_dir", "plot", "tensorboard", "device",
})


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
        raise ValueError(f"{field.name} must be of type {field.type}; got {value!r}")
    return value


def from_dict(values: dict) -> Config:
    fields = {field.name: field for field in dataclasses.fields(Config)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    config = Config(**{key: _typed(fields[key], value) for key, value in values.items()})
    validate(config)
    return config


def validate(config: Config) -> None:
    for key, allowed in CHOICES.items():
        if getattr(config, key) not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(map(str, allowed))}; got {getattr(config, key)!r}")
    for key in ("micro_batch_size", "grad_accum_steps", "max_length", "steps"):
        if not isinstance(getattr(config, key), int) or getattr(config, key) < 1:
            raise ValueError(f"{key} must be a positive integer; got {getattr(config, key)!r}")
    if not 0 <= config.eval_fraction < 1:
        raise ValueError(f"eval_fraction must lie in [0, 1); got {config.eval_fraction}")
    _validate_objective(config)


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
            raise ValueError(f"curriculum must be none, rank or a number of stages >= 1; got {curriculum!r}")
        if is_unpaired(config) or is_listwise(config):
            raise ValueError(f"curriculum turns ranked lists into pairs for a pairwise loss; loss_type "
                             f"{names[0]!r} is {'unpaired' if is_unpaired(config) else 'listwise'}")
    if not isinstance(config.list_size, int) or config.list_size < 2:
        raise ValueError(f"list_size must be an integer >= 2; got {config.list_size!r}")
    if config.shared_prompt:
        if is_unpaired(config):
            raise ValueError(f"shared_prompt packs a prompt's pair or list; loss_type {names[0]!r} is unpaired")
        if config.ld_alpha is not None:
            raise ValueError("ld_alpha needs padded batches (it pairs chosen and rejected tokens): "
                             "set shared_prompt: false")
        if "flash" in config.attn_implementation:
            raise ValueError(f"shared_prompt needs an attention mask flash-attention's varlen kernels cannot "
                             f"express: set attn_implementation to sdpa, eager or flex_attention; got "
                             f"{config.attn_implementation!r}")
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
            raise ValueError(f"expected --key value, got {arg!r}")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args):
            key, text = arg[2:], args[i + 1]
            i += 2
        else:
            raise ValueError(f"{arg} needs a value")
        value = yaml.safe_load(text)
        key = key.replace("-", "_")
        if "." in key:
            outer, inner = key.split(".", 1)
            overrides.setdefault(outer, {})[inner] = value
        else:
            overrides[key] = value
    return overrides


def load(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Read a YAML config (the bundled default when path is None) and apply overrides."""
    path = default_path() if path is None else Path(path)
    with open(path) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config must be a mapping of key: value")
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    try:
        return from_dict(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
