"""prefops: train, evaluate, benchmark and check fused preference losses.

Each command group lives in its own module with an add_commands(subparsers) hook
that adds its subcommands with a `run(args, rest)` default (returning an exit
status, or None for 0); to add one, write such a hook and list it in COMMAND_GROUPS.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_GROUPS = ("prefops.training.cli", "prefops.tools.bench", "prefops.tools.compare")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefops", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_GROUPS:
        importlib.import_module(module).add_commands(subparsers)
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
