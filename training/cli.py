"""`prefops train [CONFIG.yaml] [--key value ...]` and `prefops eval [--out_dir RUN | --checkpoint PATH] [...]`."""
from __future__ import annotations

import argparse
from pathlib import Path

from .config import OFS_KEYS, ONLINE_KEYS, RESUME_FREE_KEYS, as_yaml, default_path, key_help, load, parse_overrides

TRAIN_DESCRIPTION = f"""\
Train a model: an optional SFT stage, then preference optimisation on the fused losses.
Without CONFIG.yaml it runs the bundled default job ({default_path().name}): a tiny Llama learns
single-digit sums on CPU and the scorer's win rate is printed before and after DPO.
The log, curves.png and checkpoints go to out_dir."""

EVAL_DESCRIPTION = """\
Evaluate a checkpoint on the held-out split of its stage, with the config the run saved in it,
so no training option needs repeating. --key value may change only what evaluation observes."""


def add_commands(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="train a model (SFT, then preference optimisation)", description=TRAIN_DESCRIPTION,
        usage="prefops train [CONFIG.yaml] [--key value ...]", epilog=keys_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    train.set_defaults(run=run_train)
    evaluate = subparsers.add_parser(
        "eval", help="evaluate a run's checkpoint with its own config", description=EVAL_DESCRIPTION,
        usage="prefops eval [--out_dir RUN | --checkpoint PATH] [--key value ...]",
        epilog="keys evaluation may change: " + ", ".join(sorted(RESUME_FREE_KEYS - {"resume", "checkpoint_every"})),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("--checkpoint", help="checkpoint to evaluate (default: OUT_DIR/last.pt)")
    evaluate.set_defaults(run=run_eval)


def keys_epilog() -> str:
    """Every config key with the default job's value ([the built-in default] where it differs) and meaning."""
    lines = ["config keys (--key value), with the default job's value [and, where it differs, the built-in",
             "default that a CONFIG.yaml of yours starts from]:"]
    for name, job, builtin, meaning in key_help():
        shown = as_yaml(job) + (f" [{as_yaml(builtin)}]" if job != builtin else "")
        entry = f"  {name} = {shown}"
        lines += [entry.ljust(34) + meaning] if len(entry) < 33 else [entry, " " * 34 + meaning]
    for section, keys in (("online", ONLINE_KEYS), ("ofs_dpo", OFS_KEYS)):
        lines.append(f"keys of the {section} section (--{section}.key value), with their defaults:")
        for name, (default, meaning) in keys.items():
            entry = f"  {section}.{name} = {as_yaml(default)}"
            lines += [entry.ljust(34) + meaning] if len(entry) < 33 else [entry, " " * 34 + meaning]
    return "\n".join(lines)


def config_from(rest: list[str]):
    """The config from the optional leading YAML path and the --key value overrides after it.

    Parsed by hand: argparse would take the value of an unknown --key for the positional path.
    """
    path = rest[0] if rest and not rest[0].startswith("--") else None
    return load(path, parse_overrides(rest[1:] if path else rest))


def run_train(args: argparse.Namespace, rest: list[str]) -> None:
    config = config_from(rest)
    from .run import train
    train(config)


def run_eval(args: argparse.Namespace, rest: list[str]) -> None:
    if rest and not rest[0].startswith("--"):
        raise ValueError(f"{rest[0]}: eval takes no CONFIG.yaml; it uses the config saved with the run "
                         "(--out_dir RUN or --checkpoint PATH)")
    overrides = parse_overrides(rest)
    path = Path(args.checkpoint) if args.checkpoint else Path(overrides.get("out_dir", load().out_dir)) / "last.pt"
    from .loop import evaluate
    evaluate(None, path, overrides)
