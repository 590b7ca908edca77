"""The options of `prefops bench` and `prefops compare`, and those every benchmark script shares,
without importing torch: `prefops bench --help` answers at once, and the command's module (with
torch) is imported only when it runs."""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Optional

# name: (hidden size, vocabulary, final logit softcap)
PRESETS = {
    "llama3-8b": (4096, 128256, None),
    "llama3.2-1b": (2048, 128256, None),
    "qwen2.5-7b": (3584, 152064, None),
    "gemma2-9b": (3584, 256000, 30.0),
    "mistral-7b": (4096, 32768, None),
}


# The rows of prefops.tools.bench.ROWS (tests/test_cli_bench_compare.py keeps the two in step).
ROW_NAMES = ("naive", "compile", "lean", "budget", "trl", "liger", "cce")
DTYPE_NAMES = ("float32", "bfloat16", "float16")

TINY = dict(hidden=64, vocab=1000, tokens=256, seq_len=64, seq_lens=(32, 64, 128))


def add_timing_options(parser, tiny_help="tiny shapes, to smoke-test the script", *, reps=(20, 3),
                       warmup=(3, 1)) -> None:
    """--reps, --warmup, --device, --tiny: the options every benchmark script shares.

    reps and warmup are the (CUDA, CPU) defaults; pass the same ones to timing_defaults."""
    parser.add_argument("--reps", type=int,
                        help=f"timed repetitions per row (default {reps[0]} on CUDA, {reps[1]} on CPU)")
    parser.add_argument("--warmup", type=int,
                        help=f"untimed calls first (default {warmup[0]} on CUDA, {warmup[1]} on CPU)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help=tiny_help)


def comma_choices(allowed):
    """An argparse type: comma-separated names, each one of `allowed`, as a list ('' gives none)."""
    def names(text: str) -> list[str]:
        chosen = [name for name in text.split(",") if name]
        unknown = [name for name in chosen if name not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
        return chosen
    return names


def add_choices_option(parser, option: str, allowed, default: Optional[str] = None,
                       help: Optional[str] = None) -> None:
    """A comma-separated subset of `allowed` (default: all), parsed to a list; argparse names the option in
    its error."""
    everything = ",".join(allowed)
    parser.add_argument(option, type=comma_choices(allowed), default=everything if default is None else default,
                        help=help or "comma-separated subset of " + everything)


def choices_option(text: str, allowed, option: str) -> list[str]:
    """comma_choices outside argparse: ValueError naming `option` and the allowed names."""
    try:
        return comma_choices(allowed)(text)
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"{option}: {error}") from None


def add_commands(subparsers) -> None:
    _add_bench(subparsers)
    _add_compare(subparsers)


def _lazy(module: str, function: str):
    def run(args, rest):
        return getattr(importlib.import_module(module), function)(args, rest)
    return run


def _add_bench(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", prog="prefops bench",
        help="time fused DPO fwd+bwd against PyTorch, TRL, Liger and CCE on this GPU",
        description="Op-level benchmark of DPO (sigmoid) forward+backward from hidden states and lm_head: "
                    "median time, ratio to the 3-GEMM floor, memory beyond the gradients and error against an "
                    "fp32 reference per row, plus time and memory against sequence length (PNG plots).",
        epilog=f"presets: {', '.join(PRESETS)}. Without a GPU: prefops bench --device cpu --tiny (smoke test).")
    parser.add_argument("--model-config", default="llama3-8b",
                        help="preset name or path to a Hugging Face config.json (default llama3-8b)")
    parser.add_argument("--hidden", type=int, help="hidden size H (overrides the model's)")
    parser.add_argument("--vocab", type=int, help="vocabulary size V (overrides the model's)")
    parser.add_argument("--softcap", type=float, help="final logit softcap (overrides the model's)")
    parser.add_argument("--tokens", type=int, help="tokens in the table's batch, chosen + rejected (default 8192)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence in the table's batch (default 1024)")
    parser.add_argument("--seq-lens", help="sequence lengths of the sweep for the plots, comma-separated "
                        "(default 1024,2048,4096,8192; '' for none)")
    parser.add_argument("--sweep-pairs", type=int, default=1, help="pairs per batch in the sweep (default 1)")
    parser.add_argument("--rows", default=",".join(ROW_NAMES),
                        help="comma-separated subset of " + ",".join(ROW_NAMES))
    add_timing_options(parser, f"tiny shapes (H {TINY['hidden']}, V {TINY['vocab']}) to smoke-test, e.g. on CPU")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench"),
                        help="where report.md and the PNG plots go (default runs/bench, next to the training runs)")
    parser.set_defaults(run=_lazy("prefops.tools.bench", "run_bench"))


def _add_compare(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", prog="prefops compare", help="check every fused op and loss against its float64 reference",
        description="Runs every fused op and loss, and its float64 reference, on fresh random inputs of odd "
                    "shapes; prints per entry the max relative error of values and gradients, the tolerance it "
                    "is held to (values 1e-5 in every dtype; gradients 1e-5 in float32, 3 units of roundoff of "
                    "bfloat16/float16, which store them; unless the entry states its own), the "
                    "strategy that ran and the warnings raised, and exits 1 when an entry is over tolerance, "
                    "cannot run, or runs another strategy than the one it expects.")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"),
                        help="prefops backend; triton on CPU runs under TRITON_INTERPRET=1 (slow)")
    parser.add_argument("--only", help="comma-separated entry names or families (op, objective, pairwise, "
                        "pairwise/sigmoid, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="list the entries and exit")
    parser.set_defaults(run=_lazy("prefops.tools.compare", "run_compare"))
