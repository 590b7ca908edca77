"""`prefops train [CONFIG.yaml] [--key value ...]` and `prefops eval [CONFIG.yaml] [--checkpoint PATH] [...]`."""
from __future__ import annotations

import argparse

from .config import load, parse_overrides, valid_keys


def add_commands(subparsers) -> None:
    for name, help_text in (("train", "train a model (SFT, then preference optimisation)"),
                            ("eval", "evaluate a checkpoint on the held-out split")):
        parser = subparsers.add_parser(
            name, help=help_text, usage=f"prefops {name} [CONFIG.yaml] [--key value ...]",
            description=f"{help_text}. CONFIG.yaml defaults to the bundled default job.",
            epilog=f"config keys: {', '.join(valid_keys())}")
        if name == "eval":
            parser.add_argument("--checkpoint", help="checkpoint to evaluate (default: OUT_DIR/last.pt)")
        parser.set_defaults(run=run_train if name == "train" else run_eval)


def config_from(rest: list[str]):
    """The config from the optional leading YAML path and the --key value overrides after it.

    Parsed by hand: argparse would take the value of an unknown --key for the positional path.
    """
    path = rest[0] if rest and not rest[0].startswith("--") else None
    return load(path, parse_overrides(rest[1:] if path else rest))


def run_train(args: argparse.Namespace, rest: list[str]) -> None:
    from .loop import train
    train(config_from(rest))


def run_eval(args: argparse.Namespace, rest: list[str]) -> None:
    from .loop import evaluate
    evaluate(config_from(rest), args.checkpoint)
