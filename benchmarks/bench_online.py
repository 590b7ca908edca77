"""Online benchmark: rounds of the online loop at the Llama-3.2-1B shape, timed phase by phase.

    python benchmarks/bench_online.py --out online.md                      # 64 prompts x 4 samples x 256 tokens
    python benchmarks/bench_online.py --sample-batch 256 --out online.md   # one generate() call for the round
    python benchmarks/bench_online.py --device cpu --tiny                  # smoke test of the script's logic

A round is what training/online.py does with reference_update: round, in one process:
  sample   training/sampling.sample: --samples completions of --new-tokens for each of --prompts
           prompts, --sample-batch sequences per generate() call (the trainer's default
           sample_batch_size is 64), KV cache, temperature 1, on the fp32 policy as the trainer
           samples it;
  judge    judges.FunctionJudge around a cheap scorer (the share of a completion's tokens in the
           lower half of the vocabulary), so this row is the judging machinery, not a judge model;
  pair     pairing.build_records (best against worst of each prompt), then tokenised (data.build_dataset);
  reference  the round's reference log-probs: the policy at the round's start, one no-grad forward
           over every pair (the trainer's frozen reference model does the same forwards in its steps);
  train    --steps optimizer steps of --micro-batch pairs (data.step_indices picks them, as the
           trainer does): loop.run_batches with the fused sigmoid DPO loss (loss_impl fused), bf16
           autocast, gradient checkpointing, clipping and AdamW, as bench_training.py's prefops row.
The model is random-initialised from bench_training.py's Llama-3.2-1B config (vocabulary 128256,
tied embeddings). The tokenizer is synthetic: token i is the character U+E000 + i, so any id
decodes and encodes back to itself, and prompts are --prompt-len random ids. Its EOS lies outside
the vocabulary, so no sample stops early: every completion is --new-tokens long (checked).

Every phase is timed by the wall clock between device synchronisations (the judge and pairing run
on the host). The first --warmup rounds (1) also compile and autotune: the time split gives the
medians of the --reps rounds after them (2 on CUDA), and every round has its own row. Generation
tokens/s counts generated tokens; training tokens/s every token of the pairs (prompt and completion,
chosen and rejected) of the steps.
Peak memory per phase is the peak allocated during it beyond what was allocated at its start (CUDA
allocator counters; on CPU prefops.memory.AllocationRecorder), and on CUDA the round's maximum allocated.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from prefops.tools.bench import (add_timing_options, environment_line, finish_report, fmt_gb, markdown_table,
                                 peak_during, require_device, timing_defaults)
from prefops.training import config as C, data as D, judges, loop as L, model as M, objectives as O, pairing, references
from prefops.training import sampling

from bench_training import LLAMA_1B, TINY

PHASES = ("sample", "judge", "pair", "reference", "train")
REPS, WARMUP = (2, 1), (1, 1)  # timed and untimed rounds (CUDA, CPU): a round at the 1B shape takes ~10-30 s
FIRST_ID = 0xE000  # private-use code points, then on: no surrogate in the 128256 ids above it


class SyntheticTokenizer:
    """Token i <-> the character chr(FIRST_ID + i): the part of a tokenizer sampling and data use."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.pad_token_id, self.bos_token_id = 0, 1
        self.eos_token_id = vocab_size  # never sampled: every completion runs to max_new_tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.bos_token_id] * add_special_tokens + [ord(char) - FIRST_ID for char in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        skipped = (self.pad_token_id, self.bos_token_id) if skip_special_tokens else ()
        return "".join(chr(FIRST_ID + int(i)) for i in ids if int(i) not in skipped)

    def prompts(self, n: int, length: int, seed: int) -> list[str]:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, self.vocab_size, (n, length), generator=generator)
        return [self.decode(row) for row in ids.tolist()]


def scorer(vocab_size: int):
    """A cheap judge: the share of a completion's tokens in the lower half of the vocabulary."""
    def score(prompts, completions):
        return [sum(ord(char) - FIRST_ID < vocab_size // 2 for char in completion) / max(len(completion), 1)
                for completion in completions]
    return score


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, help="prompts a round (64)")
    parser.add_argument("--samples", type=int, default=4, help="completions sampled per prompt")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per completion (256)")
    parser.add_argument("--prompt-len", type=int, help="tokens of every prompt (128)")
    parser.add_argument("--sample-batch", type=int, help="sequences per generate() call (64)")
    parser.add_argument("--micro-batch", type=int, help="pairs per optimizer step (8)")
    parser.add_argument("--steps", type=int, help="optimizer steps a round (default: the round's pairs over "
                                                  "--micro-batch, one pass)")
    add_timing_options(parser, tiny_help="a tiny model and short samples, to smoke-test the script", reps=REPS,
                       warmup=WARMUP)
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    defaults = dict(prompts=(64, 8), new_tokens=(256, 12), prompt_len=(128, 8), sample_batch=(64, 16),
                    micro_batch=(8, 2))
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    timing_defaults(args, reps=REPS, warmup=WARMUP)
    for name in ("prompts", "new_tokens", "prompt_len", "sample_batch", "micro_batch", "steps", "reps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer; got {value}")
    if args.samples < 2:
        parser.error(f"--samples must be >= 2 (a pair needs two completions); got {args.samples}")
    return args


class Bench:
    """The policy, its optimizer and the trainer's config; round() runs and times one round."""

    def __init__(self, args, device: torch.device):
        import transformers
        self.args, self.device = args, device
        model_config = transformers.LlamaConfig(**(TINY if args.tiny else LLAMA_1B))
        self.tokenizer = SyntheticTokenizer(model_config.vocab_size)
        self.config = C.from_dict(dict(loss_type="sigmoid", beta=0.1, loss_impl="fused", reference="precomputed",
                                       bf16=device.type == "cuda", gradient_checkpointing=True,
                                       micro_batch_size=args.micro_batch))
        model_config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with device:
            self.model = transformers.LlamaForCausalLM(model_config)
        M.enable_checkpointing(self.model)
        self.lm = M.FusedLM(self.model.train())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6, betas=(0.9, 0.95))
        self.autocast = lambda: M.autocast(device, self.config.bf16)
        self.judge = judges.FunctionJudge("share of low ids", scorer(model_config.vocab_size))

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, name: str, fn, record: dict):
        """fn()'s result; its seconds and memory peak go to record."""
        def clocked():
            self.sync()
            began = time.perf_counter()
            result = fn()
            self.sync()
            return result, time.perf_counter() - began
        (result, record[f"{name}_s"]), record[f"{name}_peak"] = peak_during(clocked, device=self.device,
                                                                           record_cpu=True)
        if self.device.type == "cuda":  # peak_during reset the allocator's peak at the phase's start
            record["max_allocated"] = max(record.get("max_allocated", 0), torch.cuda.max_memory_allocated(self.device))
        return result

    def round(self, index: int) -> dict:
        args, record = self.args, {}
        prompts = self.tokenizer.prompts(args.prompts, args.prompt_len, seed=index)
        samples = self.timed("sample", lambda: sampling.sample(
            self.model, self.tokenizer, prompts, k=args.samples, max_new_tokens=args.new_tokens, seed=index,
            device=self.device, batch_size=args.sample_batch, progress=False), record)
        expected = args.prompts * args.samples * args.new_tokens
        if samples.new_tokens != expected:
            raise RuntimeError(f"sampled {samples.new_tokens} tokens, expected {expected}: a sample stopped early")
        calls = self.judge.calls
        scores = self.timed("judge", lambda: self.judge.scores(prompts, samples.completions), record)

        def pair():
            records, stats = pairing.build_records(prompts, samples.completions, scores, mode="best_worst")
            return D.build_dataset(records, self.tokenizer, args.prompt_len + 1 + args.new_tokens, [],
                                   append_eos=False), stats
        dataset, stats = self.timed("pair", pair, record)
        steps = args.steps or math.ceil(len(dataset) / args.micro_batch)
        batches = [D.collate(dataset, D.step_indices(len(dataset), step, args.micro_batch, 0, "dpo", None),
                             packing=False).to(self.device) for step in range(steps)]
        logps = references.frozen_model(self.lm, self.config.loss_impl, self.autocast)
        reference = self.timed("reference", lambda: {id(batch): logps(batch) for batch in batches}, record)
        objective = O.PreferenceObjective(self.config, lambda batch: reference[id(batch)])

        def train():
            losses = []
            for batch in batches:
                losses.append(L.run_batches(self.lm, objective, [batch], self.autocast, backward=True)["loss"])
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            return losses
        losses = self.timed("train", train, record)
        record.update(new_tokens=samples.new_tokens, pairs=stats["pairs"], judge_calls=self.judge.calls - calls,
                      steps=steps, train_tokens=sum(batch.num_tokens for batch in batches), first_loss=losses[0],
                      last_loss=losses[-1])
        record["round_s"] = sum(record[f"{phase}_s"] for phase in PHASES)
        return record


def report(args, device, records: list[dict]) -> str:
    timed = records[args.warmup:]  # the first round compiles and autotunes
    median = lambda key: statistics.median(r[key] for r in timed)  # noqa: E731
    peak = lambda key: None if timed[0][key] is None else max(r[key] for r in timed)  # noqa: E731
    total = median("round_s")
    rates = {"sample": ("generated", median("new_tokens") / median("sample_s")),
             "train": ("trained", median("train_tokens") / median("train_s"))}
    rows = [[phase, f"{median(f'{phase}_s'):.3f}", f"{median(f'{phase}_s') / total:.1%}",
             f"{rates[phase][1]:,.0f} {rates[phase][0]}" if phase in rates else "-", fmt_gb(peak(f"{phase}_peak"))]
            for phase in PHASES]
    rows.append(["round", f"{total:.3f}", "100.0%", "-",
                 fmt_gb(max(r["max_allocated"] for r in timed)) + " max allocated" if device.type == "cuda" else "-"])
    mode = "tiny model (smoke test)" if args.tiny else "Llama-3.2-1B shape, random init"
    last = records[-1]
    lines = [
        "# Online benchmark: one round of sample, judge, pair, reference, train", "", environment_line(device), "",
        f"{mode}; {args.prompts} prompts of {args.prompt_len} tokens x {args.samples} samples x {args.new_tokens} "
        f"new tokens ({last['new_tokens']:,} generated a round), {args.sample_batch} sequences per generate() call "
        f"on the fp32 policy; best-worst pairs; {last['steps']} steps of {args.micro_batch} pairs, fused sigmoid DPO, "
        f"bf16 autocast {'on' if device.type == 'cuda' else 'off'}, gradient checkpointing, AdamW.", "",
        f"## Time split: median of {args.reps} round(s) after {args.warmup} warm-up round(s)", "",
        markdown_table(["phase", "seconds", "share", "tokens/s", "peak GB beyond its start"], rows), "",
        "## Every round", "",
        markdown_table(["round", *[f"{phase} s" for phase in PHASES], "pairs", "judge calls", "train tokens",
                        "loss first -> last step"],
                       [[i + 1, *[f"{r[f'{phase}_s']:.3f}" for phase in PHASES], r["pairs"], r["judge_calls"],
                         f"{r['train_tokens']:,}", f"{r['first_loss']:.5f} -> {r['last_loss']:.5f}"]
                        for i, r in enumerate(records)]), ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = require_device(args)
    bench = Bench(args, device)
    records = []
    rounds = args.warmup + args.reps
    for index in range(rounds):
        records.append(bench.round(index))
        print(f"round {index + 1}/{rounds}: " + " ".join(
            f"{phase}={records[-1][f'{phase}_s']:.3f}s" for phase in PHASES), flush=True)
    finish_report(report(args, device, records), args.out)
    return records


if __name__ == "__main__":
    main()
