"""The training loop: an optional SFT stage, then preference optimisation (DPO family).

Read top to bottom: objectives, the learning-rate schedule, then the Trainer that
builds everything from a Config and runs the stages. Every optimizer step sees
micro_batch_size * grad_accum_steps examples; its loss is normalised by the
number of pairs (preference) or completion tokens (SFT) of the whole step, so
accumulating 4 micro-batches of 1 gives the gradient of one batch of 4.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from prefops.losses import REFERENCE_FREE, pairwise_loss

from . import checkpoint, references
from . import data as D
from . import model as M
from .logs import RunLog
from .synthetic import TASKS


class Stage(NamedTuple):
    steps: int
    lr: float
    train_set: D.Dataset
    objective: object
    eval_set: D.Dataset | None
    eval_objective: object


class OutOfMemory(MemoryError):
    pass


@contextlib.contextmanager
def explain_out_of_memory(config, where: str):
    """Turn a GPU out-of-memory error into one that says which settings to lower."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        raise OutOfMemory(
            f"GPU out of memory in {where} (micro_batch_size={config.micro_batch_size}, "
            f"max_length={config.max_length}, gradient_checkpointing={config.gradient_checkpointing}): "
            "lower micro_batch_size (raise grad_accum_steps to keep the batch size), lower max_length, "
            "or set gradient_checkpointing: true") from error


# ----------------------------------------------------------------------------- objectives

class SFTObjective:
    """Summed NLL of the completion tokens; a step divides it by the step's completion tokens."""

    def __init__(self, loss_impl: str):
        self.loss_impl = loss_impl

    def normaliser(self, batch: D.Batch) -> int:
        return batch.num_targets

    def __call__(self, model, batch: D.Batch):
        return -M.token_logprobs(model, batch, self.loss_impl).sum(), {}


class PreferenceObjective:
    """Summed per-pair loss of prefops.losses.pairwise_loss; a step divides it by the step's pairs."""

    def __init__(self, config, reference):
        self.config = config
        self.reference = reference  # batch -> (ref_chosen_logps, ref_rejected_logps) or (None, None)

    def normaliser(self, batch: D.Batch) -> int:
        return batch.num_examples

    def __call__(self, model, batch: D.Batch):
        sums, counts = M.sequence_logprobs(model, batch, self.config.loss_impl)
        pairs = batch.num_examples
        losses, metrics = pairwise_loss(
            sums[:pairs], sums[pairs:], *self.reference(batch), loss_type=self.config.loss_type,
            beta=self.config.beta, label_smoothing=self.config.label_smoothing,
            chosen_lengths=counts[:pairs], rejected_lengths=counts[pairs:], **self.config.loss_params)
        # Metrics are means over this micro-batch; weight them by its pairs to average over the step.
        return losses.sum(), {name: float(value) * pairs for name, value in metrics.items()}


def run_batches(model, objective, batches: list[D.Batch], autocast, *, backward: bool) -> dict:
    """Loss and metrics of a step made of micro-batches, normalised over all of them."""
    normaliser = sum(objective.normaliser(batch) for batch in batches)
    totals = defaultdict(float)
    for batch in batches:
        with autocast():
            loss, metrics = objective(model, batch)
        if backward:
            (loss / normaliser).backward()
        totals["loss"] += float(loss.detach())
        for name, value in metrics.items():
            totals[name] += value
    return {name: value / normaliser for name, value in totals.items()}


def lr_factor(config, steps: int):
    """Linear warmup, then cosine or linear decay to min_lr_ratio (or constant)."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - config.warmup_steps) / max(1, steps - config.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if config.lr_schedule == "cosine" else 1 - progress
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * decay
    return factor


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, config):
        self.config = config
        self.device = M.resolve_device(config.device)
        self.seed_everything(config.seed)
        task_name = config.data.split(":", 1)[1] if config.data.startswith("synthetic:") else None
        self.task = TASKS.get(task_name)
        self.model, self.tokenizer = M.build(config, self.device, self.task and self.task.alphabet)
        self.out_dir = Path(config.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.autocast = lambda: M.autocast(self.device, config.bf16)
        self.stages: dict[str, Stage] = {}

    @staticmethod
    def seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # --- data and objectives

    def datasets(self, stage: str) -> tuple[D.Dataset, D.Dataset | None]:
        config = self.config
        source = (config.sft_data or config.data) if stage == "sft" else config.data
        kind = "sft" if stage == "sft" else "preference"

        def load(source, size):
            return D.records_for(D.read_rows(source, kind=kind, size=size, seed=config.seed), stage)

        records, skipped = load(source, config.synthetic_size)
        if config.eval_data and stage != "sft":
            eval_records, eval_skipped = load(config.eval_data, config.synthetic_size // 10)
        else:
            records, eval_records = D.split(records, config.eval_fraction, config.seed)
            eval_skipped = []
        train_set = D.build_dataset(records, self.tokenizer, config.max_length, skipped, config.append_eos)
        eval_set = D.build_dataset(eval_records, self.tokenizer, config.max_length, eval_skipped,
                                   config.append_eos) if eval_records else None
        for name, dataset in (("train", train_set), ("eval", eval_set)):
            if dataset is not None and dataset.skipped:
                shown = "; ".join(dataset.skipped[:5])
                tqdm.write(f"[{stage} {name}] skipped {len(dataset.skipped)} row(s) of "
                           f"{len(dataset) + len(dataset.skipped)}: {shown}{' ...' if len(dataset.skipped) > 5 else ''}")
        return train_set, eval_set

    def reference_kind(self) -> str:
        if self.config.reference != "auto":
            return self.config.reference
        loss_types = [self.config.loss_type] if isinstance(self.config.loss_type, str) else self.config.loss_type
        return "none" if all(name in REFERENCE_FREE for name in loss_types) else "model"

    def prepare(self, stage: str) -> None:
        """Datasets and objectives of a stage; for preference training the model is now the reference."""
        config = self.config
        train_set, eval_set = self.datasets(stage)
        if stage == "sft":
            objective = SFTObjective(config.loss_impl)
            self.stages[stage] = Stage(config.sft_steps, config.sft_lr, train_set, objective, eval_set, objective)
            return
        kind = self.reference_kind()
        # Precomputed log-probs keep no reference to the model, so its memory is freed after this call.
        reference_model = M.frozen_copy(self.model) if kind != "none" else None

        def reference_for(dataset):
            if kind == "none":
                return references.no_reference
            if kind == "model":
                return references.frozen_model(reference_model, config.loss_impl, self.autocast)
            return references.precomputed(reference_model, dataset, config, self.device, self.autocast)

        self.stages[stage] = Stage(config.steps, config.lr, train_set,
                                   PreferenceObjective(config, reference_for(train_set)), eval_set,
                                   eval_set and PreferenceObjective(config, reference_for(eval_set)))

    # --- evaluation

    @torch.no_grad()
    def evaluate(self, stage: str, step: int) -> dict:
        eval_set, objective = self.stages[stage].eval_set, self.stages[stage].eval_objective
        record = {"stage": stage, "kind": "eval", "step": step}
        self.model.eval()
        if eval_set is not None:
            size = min(len(eval_set), self.config.eval_batches * self.config.micro_batch_size)
            batches = [D.collate(eval_set, list(range(start, min(start + self.config.micro_batch_size, size))),
                                 packing=self.config.packing).to(self.device)
                       for start in range(0, size, self.config.micro_batch_size)]
            with explain_out_of_memory(self.config, f"{stage} evaluation at step {step}"):
                record.update(run_batches(self.model, objective, batches, self.autocast, backward=False))
        if self.task is not None and stage != "sft":
            record["win_rate"] = self.task.win_rate(
                self.model, self.tokenizer, samples=self.config.win_rate_samples,
                temperature=self.config.sample_temperature, seed=self.config.seed, device=self.device)
        self.model.train()
        return record

    # --- one stage

    def run_stage(self, stage: str, log: RunLog, resume: dict | None) -> None:
        config = self.config
        steps, lr, train_set, objective, _, _ = self.stages[stage]
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=tuple(config.adam_betas),
                                      weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps))
        start = 0
        if resume is not None:
            self.model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            checkpoint.set_rng_state(resume["rng"])
            start = resume["step"]
        else:
            log.write(self.evaluate(stage, 0))
        self.model.train()
        bar = tqdm(range(start, steps), initial=start, total=steps, desc=stage, dynamic_ncols=True)
        for step in bar:
            began = time.perf_counter()
            indices = D.step_indices(len(train_set), step, config.batch_size, config.seed, stage)
            batches = [D.collate(train_set, indices[i:i + config.micro_batch_size], packing=config.packing)
                       .to(self.device) for i in range(0, len(indices), config.micro_batch_size)]
            with explain_out_of_memory(config, f"{stage} step {step + 1}"):
                record = run_batches(self.model, objective, batches, self.autocast, backward=True)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip or math.inf)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record_lr = scheduler.get_last_lr()[0]
            scheduler.step()
            seconds = time.perf_counter() - began
            tokens = sum(batch.num_tokens for batch in batches)
            record = {"stage": stage, "kind": "train", "step": step + 1, **record, "lr": record_lr,
                      "grad_norm": float(grad_norm), "tokens": tokens,
                      "completion_tokens": sum(batch.num_targets for batch in batches),
                      "tokens_per_s": tokens / seconds, "examples_per_s": len(indices) / seconds}
            bar.set_postfix(loss=f"{record['loss']:.4f}", **(
                {"acc": f"{record['rewards/accuracies']:.2f}"} if "rewards/accuracies" in record else {}))
            done = step + 1
            if done % config.log_every == 0 or done == steps:
                log.write(record)
                tqdm.write(format_record(record))
            if done % config.eval_every == 0 or done == steps:
                evaluation = self.evaluate(stage, done)
                log.write(evaluation)
                tqdm.write(format_record(evaluation))
            if done % config.checkpoint_every == 0 or done == steps:
                checkpoint.save(self.out_dir / "last.pt", config=config, model=self.model, stage=stage,
                                step=done, optimizer=optimizer, scheduler=scheduler)
        bar.close()

    # --- the whole job

    def train(self) -> dict:
        config = self.config
        began = time.time()
        resume = (checkpoint.load(self.out_dir / "last.pt", config=config, model=self.model)
                  if config.resume else None)
        log = RunLog(self.out_dir, tensorboard=config.tensorboard,
                     resume_from=(resume["stage"], resume["step"]) if resume else None)
        if config.sft_steps:
            if resume is not None and resume["stage"] != "sft":
                self.model.load_state_dict(self.sft_weights())  # the reference of the preference stage
            else:
                self.prepare("sft")
                self.run_stage("sft", log, resume)
                checkpoint.save(self.out_dir / "sft.pt", config=config, model=self.model, stage="sft",
                                step=config.sft_steps)
                resume = None
        self.prepare("dpo")
        self.run_stage("dpo", log, resume)
        if config.plot:
            log.plot(self.out_dir / "curves.png")
        summary = self.summary(log.records())
        summary["wall_s"] = round(time.time() - began, 1)
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.task is not None:
            tqdm.write(f"{self.task.name}: scorer win rate of sampled answers {summary['win_rate_before']:.1%} "
                       f"before DPO -> {summary['win_rate_after']:.1%} after (chance {self.task.chance:.0%})")
        tqdm.write(f"done in {summary['wall_s']:.0f} s; log, curves and checkpoints in {self.out_dir}")
        return summary

    def sft_weights(self) -> dict:
        return checkpoint.load(self.out_dir / "sft.pt", config=self.config, model=self.model)["model"]

    def summary(self, records: list[dict]) -> dict:
        evals = [r for r in records if r["stage"] == "dpo" and r["kind"] == "eval"]
        summary = {"eval_before": evals[0], "eval_after": evals[-1]}
        if self.task is not None:
            summary.update(task=self.task.name, chance=round(self.task.chance, 4),
                           win_rate_before=evals[0]["win_rate"], win_rate_after=evals[-1]["win_rate"])
        return summary


def format_record(record: dict) -> str:
    shown = ("loss", "rewards/accuracies", "rewards/margins", "win_rate", "lr", "grad_norm", "tokens_per_s")
    parts = [f"{key.split('/')[-1]}={record[key]:.4g}" for key in shown if key in record]
    return f"[{record['stage']} {record['kind']} {record['step']}] " + " ".join(parts)


def train(config) -> dict:
    return Trainer(config).train()


def evaluate(config, path: str | None = None) -> dict:
    """Evaluate a checkpoint (default out_dir/last.pt) on the held-out split of its stage."""
    trainer = Trainer(config)
    state = checkpoint.load(Path(path) if path else trainer.out_dir / "last.pt", config=config, model=trainer.model)
    if state["stage"] != "sft" and config.sft_steps:
        trainer.model.load_state_dict(trainer.sft_weights())  # so prepare() freezes the right reference
    trainer.prepare(state["stage"])
    trainer.model.load_state_dict(state["model"])
    record = trainer.evaluate(state["stage"], state["step"])
    tqdm.write(format_record(record))
    return record
