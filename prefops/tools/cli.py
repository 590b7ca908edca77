"""`prefops`: the command line. Run `prefops --help` for the commands."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (the module whose add_commands(subparsers) defines it, what it does). A command's module,
# and with it torch, is imported only when that command is given, so `prefops --help` is instant.
COMMANDS = {
    "train": ("prefops.training.cli", "train a model: optional SFT, then DPO-family preference optimisation"),
    "eval": ("prefops.training.cli", "evaluate a run's checkpoint with the config it was trained with"),
    "bench": ("prefops.tools.options", "time fused DPO forward+backward against PyTorch, TRL, Liger and CCE"),
    "compare": ("prefops.tools.options", "check every fused op and loss against its float64 reference"),
}

DESCRIPTION = """\
Fused preference-optimisation losses (DPO and its family) that never build the N x V logits:
train and evaluate a model with them, benchmark them, and check them against float64.

commands:
""" + "\n".join(f"  {name:<9}{summary}" for name, (_, summary) in COMMANDS.items())

EPILOG = """\
examples:
  prefops train                          the default job: a tiny Llama learns sums on CPU (about a minute)
  prefops train --steps 200 --beta 0.1   any config key as --key value; `prefops train --help` lists them
  prefops eval --out_dir runs/default    evaluate that run again
  prefops compare --only pairwise        fused against float64, one family
  prefops bench --device cpu --tiny      smoke-test the benchmark without a GPU"""


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (none for the top-level help)."""
    parser = argparse.ArgumentParser(prog="prefops", description=DESCRIPTION, epilog=EPILOG,
                                     usage="prefops {" + ",".join(COMMANDS) + "} [--help] ...",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # The description lists the commands; argparse's own list would repeat it.
    subparsers = parser.add_subparsers(dest="command", required=True, help=argparse.SUPPRESS)
    chosen = COMMANDS[command][0] if command in COMMANDS else None
    if chosen:
        importlib.import_module(chosen).add_commands(subparsers)
    for name, (module, summary) in COMMANDS.items():
        if module != chosen:  # never parsed: the command given is not one of these
            subparsers.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((arg for arg in argv if not arg.startswith("-")), None))
    # Config overrides (--key value) are open-ended, so they are whatever argparse does not know.
    args, rest = parser.parse_known_args(argv)
    try:
        status = args.run(args, rest)
    except (ValueError, FileNotFoundError, MemoryError) as error:
        print(f"prefops {args.command}: error: {error}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
