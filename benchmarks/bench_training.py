"""Training benchmark: a ~1B Llama trained with DPO (sigmoid), prefops' fused loss against the naive one.

    python benchmarks/bench_training.py --part throughput --out train.md     # 4 pairs x 2048 tokens, both rows
    python benchmarks/bench_training.py --part longest --rows prefops --out train.md
    python benchmarks/bench_training.py --part longest --rows naive --out train.md
    python benchmarks/bench_training.py --device cpu --tiny                   # smoke test of the script's logic

The model is random-initialised from a Llama-3.2-1B-shaped config (hidden 2048,
16 layers, 32 heads, 8 KV heads, intermediate 8192, vocabulary 128256, tied
embeddings): fp32 weights and AdamW state, bf16 autocast, gradient checkpointing,
gradient clipping, as `prefops train` runs it. Both rows run the trainer's own
step (prefops.training.loop.run_batches, then clip and AdamW); they differ only
in loss_impl: `fused` (prefops.PreferenceLoss from hidden states and the head
weight) or `reference` (the naive loss: materialised bf16 logits, fp32
log_softmax, gather, then the same pairwise_loss). Reference log-probs are
fixed numbers (precomputed), so the reference model's forward is in neither row.

throughput: median time of a full optimizer step at --pairs x --seq-len tokens
    per sequence (a prompt of --prompt-len, the rest completion), as tokens/s,
    and the peak memory of the step (beyond what was allocated before it, and in all).
longest: the longest single pair (both sequences that long) a step can train,
    to --granularity tokens (1024): lengths double from --start until a step runs
    out of memory or --stop is reached, then a bisection between the last success
    and the first failure. Every try frees its memory before the next.
Each part and row runs in one process well inside 10 minutes on an H100; pass
--rows and --part to run them as separate commands.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from prefops.tools.bench import (add_choices_option, add_timing_options, attempt, environment_line, finish_report, fmt_gb,
                           free_memory, markdown_table, median_ms, peak_during, require_device, timing_defaults)
from prefops.training import config as C, data as D, loop as L, model as M

ROWS = {"prefops": "fused", "naive": "reference"}
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
                rope_theta=500000.0)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=1000, tie_word_embeddings=True, max_position_embeddings=4096)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_choices_option(parser, "--part", ("throughput", "longest"),
                       help="comma-separated parts: throughput (step time, tokens/s, peak memory) and/or longest "
                            "(the longest single pair a step can train); default both")
    add_choices_option(parser, "--rows", ROWS)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (throughput)")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens of every sequence")
    parser.add_argument("--start", type=int, help="first length tried by the longest-pair search (4096)")
    parser.add_argument("--stop", type=int, help="longest length tried (131072)")
    parser.add_argument("--granularity", type=int, help="resolution of the longest-pair search (1024)")
    parser.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    add_timing_options(parser, tiny_help="a tiny model and short sequences, to smoke-test the script")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    defaults = (64, 256, 64) if args.tiny else (4096, 131072, 1024)
    args.start, args.stop, args.granularity = (given or default for given, default in zip(
        (args.start, args.stop, args.granularity), defaults))
    if args.tiny:
        args.seq_len, args.prompt_len = min(args.seq_len, 64), min(args.prompt_len, 16)
    timing_defaults(args, reps=(10, 3), warmup=(2, 1))  # a 1B training step is long: fewer reps than kernels
    return args


class Bench:
    """One model, optimizer and trainer config per row; the step is the trainer's."""

    def __init__(self, args, device: torch.device, row: str):
        self.args, self.device = args, device
        self.config = C.from_dict(dict(
            loss_type="sigmoid", beta=0.1, loss_impl=ROWS[row], reference="precomputed", bf16=args.device == "cuda",
            gradient_checkpointing=not args.no_checkpointing, micro_batch_size=args.pairs))
        import transformers
        model_config = transformers.LlamaConfig(**(TINY if args.tiny else LLAMA_1B))
        model_config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with self.device:
            model = transformers.LlamaForCausalLM(model_config)
        if self.config.gradient_checkpointing:
            M.enable_checkpointing(model)
        self.model, self.lm = model.train(), M.FusedLM(model)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95))
        self.autocast = lambda: M.autocast(self.device, self.config.bf16)

    def batch(self, pairs: int, seq_len: int) -> tuple[D.Batch, tuple]:
        """Random tokens: [chosen; rejected] sequences of seq_len, the first prompt_len of them prompt."""
        generator = torch.Generator().manual_seed(seq_len)
        vocab = self.model.config.vocab_size
        input_ids = torch.randint(0, vocab, (2 * pairs, seq_len), generator=generator)
        input_ids[pairs:, :self.args.prompt_len] = input_ids[:pairs, :self.args.prompt_len]
        targets = torch.full_like(input_ids, D.IGNORE_INDEX)
        prompt = min(self.args.prompt_len, seq_len - 1)
        targets[:, prompt - 1:-1] = input_ids[:, prompt:]
        batch = D.Batch(input_ids, targets, torch.ones_like(input_ids), None, None, torch.arange(pairs)).to(self.device)
        reference = tuple(-2.0 * (seq_len - prompt) + torch.randn(pairs, generator=generator) for _ in range(2))
        return batch, tuple(r.to(self.device) for r in reference)

    def step(self, batch: D.Batch, reference: tuple) -> dict:
        objective = L.PreferenceObjective(self.config, lambda _: reference)
        record = L.run_batches(self.lm, objective, [batch], self.autocast, backward=True)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return record

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def throughput(args, device, row: str) -> list:
    bench = Bench(args, device, row)
    batch, reference = bench.batch(args.pairs, args.seq_len)
    first = bench.step(batch, reference)  # also allocates the AdamW state, so the peak below is the step's own
    ms = median_ms(lambda: bench.step(batch, reference), device=bench.device, reps=args.reps, warmup=args.warmup)
    _, peak = peak_during(lambda: bench.step(batch, reference), device=bench.device, record_cpu=args.tiny)
    total = torch.cuda.max_memory_allocated(bench.device) if bench.device.type == "cuda" else None
    tokens = batch.input_ids.numel()
    return [row, f"{args.pairs} x {args.seq_len}", f"{ms:.1f}", f"{tokens / ms * 1e3:,.0f}",
            fmt_gb(peak) if peak is not None else "n/a", fmt_gb(total) if total is not None else "n/a",
            f"{first['loss']:.5f}"]


def trains(bench: Bench, length: int) -> bool:
    """Whether one step on a single pair of `length` tokens fits in memory (a step that OOMs frees it)."""
    def attempt_step():
        batch, reference = bench.batch(1, length)
        bench.step(batch, reference)
        bench.sync()
    began = time.perf_counter()
    _, reason = attempt(attempt_step)
    bench.optimizer.zero_grad(set_to_none=True)
    free_memory()
    print(f"  {length:>7} tokens: {'ok' if reason is None else reason} ({time.perf_counter() - began:.1f} s)",
          flush=True)
    if reason is not None and "out of memory" not in reason:
        raise RuntimeError(f"a step at {length} tokens failed for another reason than memory: {reason}")
    return reason is None


def longest(args, device, row: str) -> list:
    bench = Bench(args, device, row)
    step = args.granularity
    stop = args.stop // step * step
    good, bad, length = 0, None, max(step, args.start // step * step)
    print(f"[{row}] longest pair search", flush=True)
    while True:  # double until a step runs out of memory or the stop is reached
        if not trains(bench, length):
            bad = length
            break
        good = length
        if length >= stop:
            break
        length = min(2 * length, stop)
    while bad is not None and bad - good > step:
        middle = (good + bad) // 2 // step * step
        good, bad = (middle, bad) if trains(bench, middle) else (good, middle)
    return [row, f"{good:,}" + (" (the --stop cap)" if bad is None else ""), "-" if bad is None else f"{bad:,}"]


def main(argv=None):
    args = parse_args(argv)
    device = require_device(args)
    mode = "tiny model (smoke test)" if args.tiny else "Llama-3.2-1B shape, random init"
    lines = ["# Training benchmark: DPO sigmoid, prefops vs naive loss", "", environment_line(device), "",
             f"{mode}; bf16 autocast {'on' if args.device == 'cuda' else 'off'}; gradient checkpointing "
             f"{'off' if args.no_checkpointing else 'on'}; AdamW; prompt {args.prompt_len} tokens per sequence", ""]
    if "throughput" in args.part:
        rows = [throughput(args, device, row) for row in args.rows]
        lines += [f"## Throughput: {args.pairs} pairs x {args.seq_len} tokens per sequence", "",
                  markdown_table(["loss", "batch", "step ms (median)", "tokens/s", "peak beyond weights+state",
                                  "max allocated", "first-step loss"], rows), ""]
        free_memory()
    if "longest" in args.part:
        rows = [longest(args, device, row) for row in args.rows]
        lines += [f"## Longest single pair (both sequences), {args.granularity}-token resolution", "",
                  markdown_table(["loss", "longest that trains", "shortest that runs out of memory"], rows), ""]
    finish_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
