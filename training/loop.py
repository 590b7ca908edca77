"""The training loop: an optional SFT stage, then preference optimisation (DPO family, KTO, BCO, listwise).

Read top to bottom: the step over micro-batches (run_batches, driving an objective of objectives.py),
the learning-rate schedule, then the Trainer that
builds everything from a Config and runs the stages. Every optimizer step sees
micro_batch_size * grad_accum_steps examples per process (times the number of
processes under torchrun, see distributed.py); its loss is normalised by the
number of pairs, lists or completions (preference) or completion tokens (SFT) of the
whole step, so accumulating 4 micro-batches of 1 gives the gradient of one batch
of 4, and 2 processes give the gradient of one process on their whole batch.
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

import prefops

from . import adapters, checkpoint, cofs, distributed, ofs, references
from . import config as C
from . import data as D
from . import model as M
from .logs import RunLog
from .objectives import ListwiseObjective, PreferenceObjective, SFTObjective, UnpairedObjective
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


@contextlib.contextmanager
def cpu_threads(count: int | None):
    """torch's CPU threads set to `count` (config.threads) for the duration, then restored."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_batches(lm, objective, batches: list[D.Batch], autocast, *, backward: bool) -> dict:
    """Loss and metrics of a step made of micro-batches (this rank's), normalised over all ranks' batches."""
    with torch.no_grad(), autocast():
        totals, extras = objective.prepare(lm, batches)
    totals = distributed.all_reduce_sums(totals)
    sums = defaultdict(float)
    for i, (batch, extra) in enumerate(zip(batches, extras)):
        distributed.set_gradient_sync(lm, i == len(batches) - 1)
        with autocast():
            loss, metrics = objective(lm, batch, totals, extra)
        if backward:
            (loss / totals["normaliser"]).backward()
        sums["loss"] += float(loss.detach())
        for name, value in metrics.items():
            sums[name] += value
    if hasattr(objective, "end_step"):
        objective.end_step(backward)
    return objective.finish(distributed.all_reduce_sums(sums), totals)


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
        distributed.initialise()
        distributed.set_context_parallel(config.context_parallel)
        distributed.set_data_parallel(config.data_parallel)
        distributed.set_tensor_parallel(config.tensor_parallel)
        self.device = distributed.local_device() if distributed.active() else M.resolve_device(config.device)
        self.seed_everything(config.seed)
        task_name = config.data.split(":", 1)[1] if config.data.startswith("synthetic:") else None
        self.task = TASKS.get(task_name)
        self.model, self.tokenizer = M.build(config, self.device, self.task and self.task.alphabet)
        if distributed.active() and distributed.tensor_parallel() == 1:
            coupled = set(C.loss_types(config)) & set(C.BATCH_COUPLED_LOSSES)
            if coupled:
                raise ValueError(f"loss_type {sorted(coupled)[0]!r} couples the pairs of a batch, so it cannot be "
                                 "split over processes: run it in one process")
        # Tensor parallelism splits the weights themselves: no data-parallel wrapper over the same ranks.
        self.lm = M.FusedLM(self.model) if distributed.tensor_parallel() > 1 else distributed.parallel(
            M.FusedLM(self.model))
        self.out_dir = Path(config.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.autocast = lambda: M.autocast(self.device, config.bf16, config.activation_offload)
        self.stages: dict[str, Stage] = {}
        self.stage_reference = None  # reference_update stage: {"stage": curriculum stage, "weights": its reference's}

    @staticmethod
    def seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # --- data and objectives

    def datasets(self, stage: str) -> tuple[D.Dataset, D.Dataset | None]:
        config = self.config
        source = (config.sft_data or config.data) if stage == "sft" else config.data
        ranked = stage != "sft" and C.uses_ranked_rows(config)
        kind = "sft" if stage == "sft" else "ranked" if ranked else "preference"
        unpaired = stage != "sft" and C.is_unpaired(config)

        def load(source, size):
            rows = D.read_rows(source, kind=kind, size=size, seed=config.seed, list_size=config.list_size)
            return D.records_for(rows, stage, unpaired=unpaired, ranked=ranked)

        def build(records, skipped):
            if ranked and config.curriculum != "none":  # after the split, so a prompt's pairs stay on one side
                records = D.curriculum_records(records, config.curriculum)
            return D.build_dataset(records, self.tokenizer, config.max_length, skipped, config.append_eos, config.seed)

        records, skipped = load(source, config.synthetic_size)
        if config.eval_data and stage != "sft":
            eval_records, eval_skipped = load(config.eval_data, config.synthetic_size // 10)
        else:
            records, eval_records = D.split(records, config.eval_fraction, config.seed)
            eval_skipped = []
        train_set = build(records, skipped)
        eval_set = build(eval_records, eval_skipped) if eval_records else None
        for name, dataset in (("train", train_set), ("eval", eval_set)):
            if dataset is not None and dataset.skipped:
                shown = "; ".join(dataset.skipped[:5])
                say(f"[{stage} {name}] skipped {len(dataset.skipped)} row(s) of "
                    f"{len(dataset) + len(dataset.skipped)}: {shown}{' ...' if len(dataset.skipped) > 5 else ''}")
        return train_set, eval_set

    def reference_kind(self) -> str:
        if self.config.reference != "auto":
            return self.config.reference
        return "model" if C.needs_reference(self.config) else "none"

    def frozen_reference(self) -> M.FusedLM:
        """A frozen copy of the current model, sharded like it under torchrun with FSDP2 (OFS-DPO: the model with
        its adapters off)."""
        if self.config.ofs_dpo:
            return ofs.BaseLM(self.model)
        if not distributed.sharding():
            return M.FusedLM(M.frozen_copy(self.model))
        return self.frozen(distributed.model_state(self.model))

    def frozen(self, state: dict) -> M.FusedLM:
        """A frozen model holding the weights `state`, sharded like the policy under torchrun with FSDP2 (whole
        under DDP: a frozen model has no gradients to all-reduce)."""
        model, _ = M.build(self.config, self.device, self.task and self.task.alphabet)
        lm = M.FusedLM(model)
        if distributed.sharding() and distributed.tensor_parallel() == 1:
            distributed.shard(lm)
        distributed.load_model_state(model, state)
        return lm.eval().requires_grad_(False)

    def prepare(self, stage: str) -> None:
        """Datasets and objectives of a stage; for preference training the model is now the reference."""
        config = self.config
        train_set, eval_set = self.datasets(stage)
        if stage == "sft":
            if config.ofs_dpo:
                adapters.train_base(self.model)
            objective = SFTObjective(config.loss_impl)
            self.stages[stage] = Stage(config.sft_steps, config.sft_lr, train_set, objective, eval_set, objective)
            return
        self.stages[stage] = Stage(config.steps, config.lr, train_set, self.objective(None), eval_set,
                                   eval_set and self.objective(None))
        self.refresh_reference(stage)

    def objective(self, reference):
        """The preference stage's objective of config.loss_type (OFS-DPO's two adapters around it when set)."""
        config = self.config
        family = (UnpairedObjective if C.is_unpaired(config) else ListwiseObjective if C.is_listwise(config)
                  else PreferenceObjective)
        objective = family(config, reference)
        return ofs.FastSlowObjective(objective, config, self.model) if config.ofs_dpo else objective

    def refresh_reference(self, stage: str) -> None:
        """The stage's objectives get a frozen copy of the model as it is now as their reference."""
        _, _, train_set, objective, eval_set, eval_objective = self.stages[stage]
        objectives = [(objective, train_set)] + ([(eval_objective, eval_set)] if eval_objective else [])
        for each, _ in objectives:  # the previous reference model is freed before the next one is built
            each.reference = None
        kind = self.reference_kind()
        # Precomputed log-probs keep no reference to the model, so its memory is freed after this call.
        reference_lm = self.frozen_reference() if kind != "none" else None
        for each, dataset in objectives:
            each.reference = references.of_dataset(kind, reference_lm, dataset, self.config, self.device,
                                                   self.autocast)

    def snapshot(self) -> dict:
        """The policy's weights now, on CPU (a copy: state_dict() alone aliases the live parameters)."""
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in
                distributed.model_state(self.model).items()}

    def curriculum_stage(self, stage: str, step: int) -> int:
        config, train_set = self.config, self.stages[stage].train_set
        return D.step_stage(len(train_set), step, config.batch_size * distributed.world_size(), config.seed, stage,
                            train_set.curriculum)

    def step_batches(self, dataset: D.Dataset, indices: list[int]) -> list[D.Batch]:
        """This rank's micro-batches of a global step's example indices (its share of their tokens under
        context parallelism)."""
        mine, size, group = distributed.shard_of(indices), self.config.micro_batch_size, distributed.context_group()
        batches = [D.collate(dataset, mine[i:i + size], packing=self.config.packing,
                             shared_prompt=self.config.shared_prompt).to(self.device)
                   for i in range(0, len(mine), size)]
        return batches if group is None else [M.context_shard(batch, group) for batch in batches]

    # --- evaluation

    @torch.no_grad()
    def evaluate(self, stage: str, step: int) -> dict:
        eval_set, objective = self.stages[stage].eval_set, self.stages[stage].eval_objective
        record = {"stage": stage, "kind": "eval", "step": step}
        self.lm.eval()
        if eval_set is not None:
            chunk, ranks = self.config.micro_batch_size * distributed.world_size(), distributed.world_size()
            size = min(len(eval_set), self.config.eval_batches * chunk) // ranks * ranks
            batches = [batch for start in range(0, size, chunk)
                       for batch in self.step_batches(eval_set, list(range(start, min(start + chunk, size))))]
            with explain_out_of_memory(self.config, f"{stage} evaluation at step {step}"):
                record.update(run_batches(self.lm, objective, batches, self.autocast, backward=False))
        if self.task is not None and stage != "sft":
            with distributed.unsharded(self.lm):
                record["win_rate"] = self.task.win_rate(
                    self.model, self.tokenizer, samples=self.config.win_rate_samples,
                    temperature=self.config.sample_temperature, seed=self.config.seed, device=self.device)
        self.lm.train()
        return record

    # --- checkpoints

    def save(self, path: Path, stage: str, step: int, optimizer=None, scheduler=None,
             extra: dict | None = None) -> None:
        """Every rank gathers its shards; rank 0 writes (with `extra` entries, e.g. an online round's pairs)."""
        model_state = distributed.model_state(self.model)
        optimizer_state = optimizer and distributed.optimizer_state(self.model, optimizer)
        objective = self.stages[stage].objective if stage in self.stages else None
        if distributed.is_main():
            checkpoint.save(path, config=self.config, model_state=model_state, stage=stage, step=step,
                            optimizer_state=optimizer_state, scheduler=scheduler,
                            objective_state=objective.state_dict() if hasattr(objective, "state_dict") else None,
                            world_size=distributed.world_size(), extra=extra)
        distributed.barrier()

    def load(self, path: Path, *, resuming: bool = False) -> dict:
        return checkpoint.load(path, config=self.config, model=self.model,
                               world_size=distributed.world_size() if resuming else None)

    # --- one stage

    def optimizer(self, lr: float, steps: int):
        """AdamW and its warmup-then-decay schedule over `steps` optimizer steps."""
        config = self.config
        params = adapters.parameter_groups(self.model, lr, config) if config.ofs_dpo else self.lm.parameters()
        optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(config.adam_betas), weight_decay=config.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps))

    def restore(self, resume: dict, optimizer, scheduler, objective) -> int:
        """Model, optimizer, schedule, loss state and RNG of a checkpoint; the step it was written at."""
        distributed.load_model_state(self.model, resume["model"])
        distributed.load_optimizer_state(self.model, optimizer, resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume.get("objective"):
            objective.load_state_dict(resume["objective"])
        checkpoint.set_rng_state(resume["rng"])
        return resume["step"]

    def train_step(self, stage: str, step: int, train_set: D.Dataset, objective, optimizer, scheduler) -> dict:
        """One optimizer step on the global batch `step` of train_set (0-based); its train record."""
        config = self.config
        began = time.perf_counter()
        global_batch = config.batch_size * distributed.world_size()
        indices = D.step_indices(len(train_set), step, global_batch, config.seed, stage, train_set.curriculum)
        batches = self.step_batches(train_set, indices)
        with explain_out_of_memory(config, f"{stage} step {step + 1}"):
            record = run_batches(self.lm, objective, batches, self.autocast, backward=True)
            grad_norm = distributed.clip_grad_norm(self.lm.parameters(), config.grad_clip or math.inf)
            optimizer.step()
        if hasattr(objective, "after_step"):
            objective.after_step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        record_lr = scheduler.get_last_lr()[0]
        scheduler.step()
        seconds = time.perf_counter() - began
        counts = {"tokens": sum(batch.num_tokens for batch in batches),
                  "completion_tokens": sum(batch.num_targets for batch in batches)}
        if config.shared_prompt:  # prompt tokens not run again for each completion
            counts["tokens_saved"] = sum(batch.tokens_saved for batch in batches)
        counts = distributed.all_reduce_sums(counts)
        return {"stage": stage, "kind": "train", "step": step + 1, **record, "lr": record_lr,
                "grad_norm": distributed.as_float(grad_norm), **{name: int(n) for name, n in counts.items()},
                "tokens_per_s": counts["tokens"] / seconds, "examples_per_s": len(indices) / seconds,
                "path": prefops.strategy.last_path()}

    def run_stage(self, stage: str, log: RunLog, resume: dict | None) -> None:
        config = self.config
        steps, lr, train_set, objective, _, _ = self.stages[stage]
        optimizer, scheduler = self.optimizer(lr, steps)
        # Curry-DPO (Pattnaik et al. 2024): the reference of each curriculum stage is the policy at its first step
        # (data.step_stage), kept in checkpoints so that a stage resumed mid-way has the same reference.
        refresh = stage != "sft" and config.reference_update == "stage"
        if resume is not None:
            if refresh:  # frozen from the model before restore() gives it back the policy's weights
                self.stage_reference = resume["stage_reference"]
                distributed.load_model_state(self.model, self.stage_reference["weights"])
                self.refresh_reference(stage)
            start = self.restore(resume, optimizer, scheduler, objective)
        else:
            start = 0
            if refresh:  # prepare() froze the policy as it is now
                self.stage_reference = {"stage": self.curriculum_stage(stage, 0), "weights": self.snapshot()}
            log.write(self.evaluate(stage, 0))
        self.lm.train()
        bar = tqdm(range(start, steps), initial=start, total=steps, desc=stage, dynamic_ncols=True,
                   disable=not distributed.is_main())
        for step in bar:
            if refresh and self.curriculum_stage(stage, step) != self.stage_reference["stage"]:
                self.stage_reference = {"stage": self.curriculum_stage(stage, step), "weights": self.snapshot()}
                self.refresh_reference(stage)
            record = self.train_step(stage, step, train_set, objective, optimizer, scheduler)
            bar.set_postfix(loss=f"{record['loss']:.4f}", **(
                {"acc": f"{record['rewards/accuracies']:.2f}"} if "rewards/accuracies" in record else {}))
            done = step + 1
            if done % config.log_every == 0 or done == steps:
                log.write(record)
                say(format_record(record))
            if done % config.eval_every == 0 or done == steps:
                evaluation = self.evaluate(stage, done)
                log.write(evaluation)
                say(format_record(evaluation))
            if done % config.checkpoint_every == 0 or done == steps:
                self.save(self.out_dir / "last.pt", stage, done, optimizer, scheduler,
                          extra={"stage_reference": self.stage_reference} if refresh else None)
        bar.close()

    # --- the whole job

    def train(self) -> dict:
        with cpu_threads(self.config.threads):
            return self._train()

    def _train(self) -> dict:
        config = self.config
        began = time.time()
        resume = self.load(self.out_dir / "last.pt", resuming=True) if config.resume else None
        log = RunLog(self.out_dir, tensorboard=config.tensorboard, enabled=distributed.is_main(),
                     resume_from=(resume["stage"], resume["step"]) if resume else None)
        if config.sft_steps:
            if resume is not None and resume["stage"] != "sft":
                distributed.load_model_state(self.model, self.sft_weights())  # the reference of the next stage
            else:
                self.prepare("sft")
                self.run_stage("sft", log, resume)
                self.save(self.out_dir / "sft.pt", "sft", config.sft_steps)
                resume = None
        if config.ofs_dpo:
            adapters.train_adapters(self.model)
        self.preference_stage(log, resume)
        if not distributed.is_main():
            return {}
        if config.plot:
            log.plot(self.out_dir / "curves.png")
        summary = self.summary(log.records())
        summary["wall_s"] = round(time.time() - began, 1)
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.task is not None:
            say(f"{self.task.name}: scorer win rate of sampled answers {summary['win_rate_before']:.1%} "
                f"before {stage_name(config)} -> {summary['win_rate_after']:.1%} after (chance {self.task.chance:.0%})")
        say(f"done in {summary['wall_s']:.0f} s; log, curves and checkpoints in {self.out_dir}")
        return summary

    def preference_stage(self, log: RunLog, resume: dict | None) -> None:
        if self.config.ofs_dpo and C.ofs_options(self.config)["domains"]:
            cofs.run_domains(self, log)  # COFS-DPO: one stage per domain (config validation refuses resume)
            return
        self.prepare("dpo")
        self.run_stage("dpo", log, resume)

    def sft_weights(self) -> dict:
        return self.load(self.out_dir / "sft.pt")["model"]

    def summary(self, records: list[dict]) -> dict:
        evals = [r for r in records if r["stage"] == "dpo" and r["kind"] == "eval"]
        summary = {"eval_before": evals[0], "eval_after": evals[-1]}
        if self.task is not None:
            summary.update(task=self.task.name, chance=round(self.task.chance, 4),
                           win_rate_before=evals[0]["win_rate"], win_rate_after=evals[-1]["win_rate"])
        return summary


def stage_name(config) -> str:
    """What the preference stage is called in messages: DPO, or the loss (KTO, SimPO, ...)."""
    names = C.loss_types(config)
    return "DPO" if names[0] == "sigmoid" else "+".join(names).upper()


def say(text: str) -> None:
    if distributed.is_main():
        tqdm.write(text)


def format_record(record: dict) -> str:
    shown = ("loss", "rewards/accuracies", "rewards/margins", "kl", "win_rate", "lr", "grad_norm", "tokens_per_s")
    parts = [f"{key.split('/')[-1]}={record[key]:.4g}" for key in shown if key in record]
    return f"[{record['stage']} {record['kind']} {record['step']}] " + " ".join(parts)


def evaluate(config=None, path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Evaluate a checkpoint (default out_dir/last.pt) on the held-out split of its stage.

    Without a config, the run's own: the one saved in the checkpoint, with `overrides` of keys that
    change only what is observed (C.RESUME_FREE_KEYS), and out_dir the checkpoint's folder (for sft.pt).
    """
    if config is None:
        path = Path(path)
        overrides = overrides or {}
        saved = checkpoint.saved_config(path)
        values = C.with_overrides(saved, overrides)
        # Repeating the run's own values is harmless; changing what it trained with is not evaluation.
        changed = sorted(key for key in overrides if key not in C.RESUME_FREE_KEYS and values[key] != saved.get(key))
        if changed:
            raise C.ConfigError(f"{C.as_option(changed[0], overrides[changed[0]])}: eval uses the config the run "
                                f"was trained with ({C.as_option(changed[0], saved.get(changed[0]))}); it may change "
                                f"only {', '.join(sorted(C.RESUME_FREE_KEYS))}", changed[0])
        try:
            config = C.from_dict({**values, "out_dir": str(path.parent)})
        except C.ConfigError as error:
            raise C.ConfigError(f"{path}: the config saved with the run: {error}") from None
    trainer = Trainer(config)
    with cpu_threads(config.threads):
        state = trainer.load(Path(path) if path else trainer.out_dir / "last.pt")
        # what prepare() freezes as the reference: the curriculum stage's (reference_update: stage), else the SFT policy
        if "stage_reference" in state:
            distributed.load_model_state(trainer.model, state["stage_reference"]["weights"])
        elif state["stage"] != "sft" and config.sft_steps:
            distributed.load_model_state(trainer.model, trainer.sft_weights())
        trainer.prepare(state["stage"])
        distributed.load_model_state(trainer.model, state["model"])
        if state.get("objective"):
            trainer.stages[state["stage"]].eval_objective.load_state_dict(state["objective"])
        record = trainer.evaluate(state["stage"], state["step"])
    say(format_record(record))
    return record
