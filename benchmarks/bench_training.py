"""Training benchmark: a ~1B Llama trained with DPO (sigmoid), prefops' fused loss against the naive one.

    python benchmarks/bench_training.py --part throughput --out train.md     # 4 pairs x 2048 tokens, both rows
    python benchmarks/bench_training.py --part longest --rows prefops --out train.md
    python benchmarks/bench_training.py --part longest --rows naive --out train.md
    python benchmarks/bench_training.py --part longest --rows trl --attention prefops --layout packed
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
A third loss row, `trl`, runs the same model and step with TRL's fused head
(trl.kernels.ChunkedLogProbFunction, as prefops.tools.bench's trl row calls it)
from the hidden states, then the same sequence sums and sigmoid DPO loss.

Every loss row runs for each --attention backend and --layout:
  sdpa     transformers' SDPA; a packed row gets the [T, T] mask transformers builds from position_ids;
  prefops  prefops.attention.register(), attn_implementation="prefops": packed sequences attend
           block by block, no mask (padded rows fall back to SDPA with the mask, as documented there);
  flash    flash_attention_2, only where flash_attn imports (skipped otherwise);
  padded   chosen and rejected as two rows of [2, L];
  packed   both in one row [1, 2L], position_ids restarting at 0 (padding-free, no attention_mask).

throughput: median time of a full optimizer step at --pairs x --seq-len tokens
    per sequence (a prompt of --prompt-len, the rest completion), as tokens/s,
    and the peak memory of the step (beyond what was allocated before it, and in all).
longest: the longest single pair (both sequences that long) a step can train,
    to --granularity tokens (1024): lengths double from --start until a step runs
    out of memory or --stop is reached, then a bisection between the last success
    and the first failure. Every try frees its memory before the next. --budget
    bounds each row's search in wall-clock seconds: no try starts once the time
    spent, plus twice the last try, passes it; the row then reports the longest
    length that trained so far, marked "(time budget)".
    The step at the longest length is broken down (MEMORY below).
MEMORY: the breakdown of one step's memory, in every table.
    weights + grads + AdamW  bytes of the parameters, their gradients and the optimizer state, counted
                             from the tensors (not from an allocator);
    activations              bytes still allocated when the forward (body and loss) returns, beyond
                             those allocated before it: what the forward keeps for backward (saved
                             tensors, checkpoint boundaries, the mask when it is saved);
    attention                the attention mask reaching the layers (bytes of the tensor, when one is
                             passed), plus the largest peak inside one attention layer's forward
                             (self_attn, projections included) beyond what was allocated at its start;
    loss                     the peak inside the loss head's forward (hidden states -> loss) beyond
                             what was allocated at its start; its backward is not separated;
    step peak                the step's peak beyond what was allocated before it.
    On CUDA the live and peak bytes come from the caching allocator (memory_allocated,
    max_memory_allocated, its peak reset at each region and folded back into the step's);
    on CPU from prefops.memory.AllocationRecorder around the whole step (its live and peak
    bytes), so the smoke run prints the same columns.
Each part and row runs in one process well inside 10 minutes on an H100; pass
--rows and --part to run them as separate commands.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import time
from pathlib import Path

import torch

import prefops.attention
from prefops.memory import AllocationRecorder
from prefops.tools.bench import (Skipped, add_choices_option, add_timing_options, attempt, dpo_loss, environment_line,
                                 finish_report, fmt_gb, free_memory, markdown_table, median_ms, require_device,
                                 timing_defaults, trl_token_logps)
from prefops.training import config as C, data as D, loop as L, model as M, objectives as O

ROWS = {"prefops": "fused", "naive": "reference", "trl": "fused"}  # trl's step replaces the loss (Bench.step)
ATTENTION = {"sdpa": "sdpa", "prefops": prefops.attention.NAME, "flash": "flash_attention_2"}
LAYOUTS = ("padded", "packed")
MEMORY_COLUMNS = ["weights + grads + AdamW", "activations", "attention", "loss", "step peak"]
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
    add_choices_option(parser, "--rows", ROWS, help="comma-separated loss rows: prefops (fused), naive "
                       "(materialised logits), trl (TRL's ChunkedLogProbFunction); default all")
    add_choices_option(parser, "--attention", ATTENTION, default="sdpa",
                       help="comma-separated attention backends: sdpa, prefops, flash (flash_attn only); default sdpa")
    add_choices_option(parser, "--layout", LAYOUTS, default="padded",
                       help="comma-separated: padded ([2, L]) and/or packed ([1, 2L], position_ids); default padded")
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="wall-clock seconds of each row's longest-pair search (default: none)")
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


class Meter:
    """Live and peak bytes of one step, and the peaks of regions inside it (MEMORY in the docstring).

    On CUDA the allocator's peak is reset at each region and folded back into the step's on the way
    out; on CPU an AllocationRecorder records the whole step and its peak is reset the same way."""

    def __init__(self, device: torch.device):
        self.device, self.recorder, self.regions = device, None, {}

    def live(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.recorder is None else self.recorder.live

    def _peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.recorder is None else self.recorder.peak

    def _reset(self):
        if self.recorder is None:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.recorder.peak = self.recorder.live

    def note(self, name: str, nbytes: int):
        self.regions[name] = max(self.regions.get(name, 0), nbytes)

    @contextlib.contextmanager
    def region(self, name: str):
        start, outer = self.live(), self._peak()
        self._reset()
        try:
            yield
        finally:
            self.note(name, self._peak() - start)
            self._high = max(self._high, outer, self._peak())

    @contextlib.contextmanager
    def step(self):
        self.regions, self._high = {}, 0
        if self.device.type != "cuda":  # a fresh recorder: the last step's record is garbage
            self.recorder = AllocationRecorder()
        with self.recorder or contextlib.nullcontext():
            start = self.live()
            self._reset()
            yield
            high = max(self._high, self._peak())
            self.note("step peak", high - start)
            if self.recorder is None:  # the regions reset the allocator's own peak
                self.note("max allocated", high)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class MeasuredLM(M.FusedLM):
    """The trainer's FusedLM, with the loss head's peak and the bytes the forward keeps for backward."""

    def __init__(self, model, meter: Meter):
        super().__init__(model)
        self.meter = meter

    def forward(self, batch: D.Batch, fn):
        def loss_head(hidden, head):
            with self.meter.region("loss"):
                return fn(hidden, head)
        before = self.meter.live()
        out = super().forward(batch, loss_head)
        self.meter.note("activations", self.meter.live() - before)
        return out


def measure_attention(model, meter: Meter):
    """Forward hooks on every self_attn: the largest layer's peak plus the mask it is given."""
    regions = []

    def enter(module, args, kwargs):
        meter.note("mask", tensor_bytes([kwargs.get("attention_mask")]))
        regions.append(meter.region("attention layer"))
        regions[-1].__enter__()

    def leave(module, args, kwargs, output):
        regions.pop().__exit__(None, None, None)

    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            module.register_forward_pre_hook(enter, with_kwargs=True)
            module.register_forward_hook(leave, with_kwargs=True)


class Bench:
    """One model, optimizer and trainer config per row; the step is the trainer's."""

    def __init__(self, args, device: torch.device, row: str, attention: str = "sdpa", layout: str = "padded"):
        self.args, self.device, self.row, self.layout = args, device, row, layout
        if attention == "flash" and importlib.util.find_spec("flash_attn") is None:
            raise Skipped("flash_attn is not importable")
        if attention == "prefops":
            prefops.attention.register()
        self.config = C.from_dict(dict(
            loss_type="sigmoid", beta=0.1, loss_impl=ROWS[row], reference="precomputed", bf16=args.device == "cuda",
            gradient_checkpointing=not args.no_checkpointing, micro_batch_size=args.pairs))
        import transformers
        model_config = transformers.LlamaConfig(**(TINY if args.tiny else LLAMA_1B))
        model_config._attn_implementation = ATTENTION[attention]
        torch.manual_seed(0)
        with self.device:
            model = transformers.LlamaForCausalLM(model_config)
        if self.config.gradient_checkpointing:
            M.enable_checkpointing(model)
        self.meter = Meter(self.device)
        measure_attention(model, self.meter)
        self.model, self.lm = model.train(), MeasuredLM(model, self.meter)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95))
        self.autocast = lambda: M.autocast(self.device, self.config.bf16)

    def batch(self, pairs: int, seq_len: int) -> tuple[D.Batch, tuple]:
        """Random tokens: [chosen; rejected] sequences of seq_len, the first prompt_len of them prompt;
        packed: one row [chosen_1 rejected_1 ...] with position_ids restarting at 0 in each sequence."""
        generator = torch.Generator().manual_seed(seq_len)
        vocab = self.model.config.vocab_size
        input_ids = torch.randint(0, vocab, (2 * pairs, seq_len), generator=generator)
        input_ids[pairs:, :self.args.prompt_len] = input_ids[:pairs, :self.args.prompt_len]
        targets = torch.full_like(input_ids, D.IGNORE_INDEX)
        prompt = min(self.args.prompt_len, seq_len - 1)
        targets[:, prompt - 1:-1] = input_ids[:, prompt:]
        reference = tuple(-2.0 * (seq_len - prompt) + torch.randn(pairs, generator=generator) for _ in range(2))
        if self.layout == "packed":
            cu_seqlens = torch.arange(2 * pairs + 1) * seq_len
            positions = torch.arange(seq_len).repeat(2 * pairs)[None]
            batch = D.Batch(input_ids.reshape(1, -1), targets.reshape(1, -1), None, positions, cu_seqlens,
                            torch.arange(pairs))
        else:
            batch = D.Batch(input_ids, targets, torch.ones_like(input_ids), None, None, torch.arange(pairs))
        return batch.to(self.device), tuple(r.to(self.device) for r in reference)

    def trl_loss(self, batch: D.Batch, reference: tuple) -> dict:
        """The trl row's loss: TRL's fused head from the hidden states, then the trainer's sequence sums."""
        def loss(hidden, head):
            hidden, weight, _ = head.cast(hidden)
            token_logps = trl_token_logps(hidden, weight, batch.targets)
            return dpo_loss(M.sequence_sums(token_logps, batch)[0], torch.cat(reference))
        with self.autocast():
            value = self.lm(batch, loss)
        value.backward()
        return {"loss": float(value.detach())}

    def step(self, batch: D.Batch, reference: tuple) -> dict:
        with self.meter.step():
            if self.row == "trl":
                record = self.trl_loss(batch, reference)
            else:
                objective = O.PreferenceObjective(self.config, lambda _: reference)
                record = L.run_batches(self.lm, objective, [batch], self.autocast, backward=True)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return record

    def breakdown(self) -> list[str]:
        """MEMORY's columns for the last step."""
        parameters = list(self.model.parameters())
        state = [t for s in self.optimizer.state.values() for t in s.values()]
        regions = self.meter.regions
        attention = regions.get("mask", 0) + regions.get("attention layer", 0)
        return [fmt_gb(2 * tensor_bytes(parameters) + tensor_bytes(state)), fmt_gb(regions.get("activations", 0)),
                fmt_gb(attention), fmt_gb(regions.get("loss", 0)), fmt_gb(regions.get("step peak", 0))]

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def combinations(args):
    return list(itertools.product(args.rows, args.attention, args.layout))


def label(row: str, attention: str, layout: str) -> list[str]:
    return [row, attention, layout]


def step_figures(args, device, row: str, attention: str = "sdpa", layout: str = "padded") -> dict:
    """One row's throughput in numbers: median step ms, tokens a step, tokens/s, the step's peak beyond what
    was allocated before it and the most allocated (bytes; None off CUDA), the first step's loss, and the
    MEMORY columns as the table prints them."""
    bench = Bench(args, device, row, attention, layout)
    batch, reference = bench.batch(args.pairs, args.seq_len)
    first = bench.step(batch, reference)  # also allocates the AdamW state, so the peak below is the step's own
    ms = median_ms(lambda: bench.step(batch, reference), device=bench.device, reps=args.reps, warmup=args.warmup)
    tokens = batch.input_ids.numel()
    return {"ms": ms, "tokens": tokens, "tokens_per_s": tokens / ms * 1e3,
            "step_peak": bench.meter.regions.get("step peak"),
            "total": bench.meter.regions.get("max allocated"),  # of the last timed step
            "loss": first["loss"], "breakdown": bench.breakdown()}


def throughput(args, device, row: str, attention: str, layout: str) -> list:
    figures = step_figures(args, device, row, attention, layout)
    total = figures["total"]
    return label(row, attention, layout) + [
        f"{args.pairs} x {args.seq_len}", f"{figures['ms']:.1f}", f"{figures['tokens_per_s']:,.0f}",
        *figures["breakdown"], fmt_gb(total) if total is not None else "n/a", f"{figures['loss']:.5f}"]


def trains(bench: Bench, length: int) -> bool:
    """Whether one step on a single pair of `length` tokens fits in memory (a step that OOMs frees it)."""
    def attempt_step():
        batch, reference = bench.batch(1, length)
        bench.step(batch, reference)
        bench.sync()
        return bench.breakdown()
    began = time.perf_counter()
    breakdown, reason = attempt(attempt_step)
    bench.optimizer.zero_grad(set_to_none=True)
    free_memory()
    print(f"  {length:>7} tokens: {'ok' if reason is None else reason} ({time.perf_counter() - began:.1f} s)",
          flush=True)
    if reason is not None and "out of memory" not in reason:
        raise RuntimeError(f"a step at {length} tokens failed for another reason than memory: {reason}")
    return breakdown


def longest(args, device, row: str, attention: str, layout: str) -> list:
    began = time.perf_counter()
    print(f"[{row}, {attention}, {layout}] longest pair search", flush=True)
    bench, reason = attempt(lambda: Bench(args, device, row, attention, layout))
    if bench is None:
        return label(row, attention, layout) + [reason, "-"] + ["-"] * len(MEMORY_COLUMNS)
    step = args.granularity
    stop = args.stop // step * step
    good, bad, length, breakdown, last_try = 0, None, max(step, args.start // step * step), None, 0.0
    out_of_time = False

    def fits(length) -> bool:
        nonlocal breakdown, last_try, out_of_time
        # The first try always runs; a longer try takes longer than the last.
        if last_try and time.perf_counter() - began + 2 * last_try > args.budget:
            out_of_time = True
            return False
        tried = time.perf_counter()
        result = trains(bench, length)
        last_try = time.perf_counter() - tried
        if result is not None:
            breakdown = result
        return result is not None

    while True:  # double until a step runs out of memory or the stop is reached
        if not fits(length):
            bad = None if out_of_time else length
            break
        good = length
        if length >= stop:
            break
        length = min(2 * length, stop)
    while bad is not None and bad - good > step and not out_of_time:
        middle = (good + bad) // 2 // step * step
        if fits(middle):
            good = middle
        elif not out_of_time:
            bad = middle
    note = " (time budget)" if out_of_time else " (the --stop cap)" if bad is None else ""
    return label(row, attention, layout) + [f"{good:,}{note}", "-" if bad is None else f"{bad:,}",
                                            *(breakdown or ["-"] * len(MEMORY_COLUMNS))]


def main(argv=None):
    args = parse_args(argv)
    device = require_device(args)
    mode = "tiny model (smoke test)" if args.tiny else "Llama-3.2-1B shape, random init"
    lines = ["# Training benchmark: DPO sigmoid, prefops vs naive and TRL losses", "", environment_line(device), "",
             f"{mode}; bf16 autocast {'on' if args.device == 'cuda' else 'off'}; gradient checkpointing "
             f"{'off' if args.no_checkpointing else 'on'}; AdamW; prompt {args.prompt_len} tokens per sequence", "",
             "Memory columns (MEMORY in benchmarks/bench_training.py): weights + grads + AdamW counted from the "
             "tensors; activations = allocated when the forward returns minus before it; attention = the mask "
             "passed to the layers plus the largest peak inside one self_attn forward; loss = the peak inside the "
             "loss head's forward; step peak = the step's peak beyond what was allocated before it. "
             + ("CUDA allocator counters." if device.type == "cuda" else "prefops.memory.AllocationRecorder."), ""]
    if "throughput" in args.part:
        rows = []
        for combination in combinations(args):
            result, reason = attempt(lambda: throughput(args, device, *combination))
            rows.append(result or label(*combination) + [reason] + ["-"] * (len(MEMORY_COLUMNS) + 5))
        lines += [f"## Throughput: {args.pairs} pairs x {args.seq_len} tokens per sequence", "",
                  markdown_table(["loss", "attention", "layout", "batch", "step ms (median)", "tokens/s",
                                  *MEMORY_COLUMNS, "max allocated", "first-step loss"], rows), ""]
        free_memory()
    if "longest" in args.part:
        rows = [longest(args, device, *combination) for combination in combinations(args)]
        budget = "" if args.budget == float("inf") else f", {args.budget:g} s per row"
        lines += [f"## Longest single pair (both sequences), {args.granularity}-token resolution{budget}", "",
                  "The memory columns are those of the step at the longest length that trained.", "",
                  markdown_table(["loss", "attention", "layout", "longest that trains",
                                  "shortest that runs out of memory", *MEMORY_COLUMNS], rows), ""]
    finish_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
