"""Checkpoints: written atomically, refused when they belong to another model or config.

A checkpoint holds everything a resumed run needs to continue step for step as if
never stopped: weights, optimizer and scheduler state, the loss's own state, every
RNG, the stage and step (the data order is a function of the step, see
data.step_indices). Under torchrun the state is gathered unsharded and rank 0 writes it.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .config import RESUME_FREE_KEYS, to_dict


class CheckpointMismatch(ValueError):
    pass


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, *, config, model_state: dict, stage: str, step: int, optimizer_state: dict | None = None,
         scheduler=None, objective_state: dict | None = None, summary: dict | None = None,
         world_size: int = 1, extra: dict | None = None) -> None:
    """Write a checkpoint from full (unsharded) model and optimizer state dicts, and `extra` entries."""
    state = {
        "stage": stage,
        "step": step,
        "config": to_dict(config),
        "shapes": {name: tuple(p.shape) for name, p in model_state.items()},
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict() if scheduler else None,
        "objective": objective_state or {},  # loss state, e.g. BCO's running reward mean
        "rng": rng_state(),
        "summary": summary or {},
        "world_size": world_size,
        **(extra or {}),
    }
    # A crash mid-write must never leave a truncated checkpoint behind: write aside, then rename.
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def saved_config(path: Path) -> dict:
    """The config a checkpoint was written with (memory-mapped: the weights are not read)."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: give the run's folder (--out_dir RUN) or --checkpoint PATH")
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["config"]


def load(path: Path, *, config, model, world_size: int | None = None) -> dict:
    """Read a checkpoint, refusing one written for another model or a different training config
    (or, to resume, by another number of processes: micro_batch_size is per process)."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} to resume from")
    state = torch.load(path, map_location="cpu", weights_only=False)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if state["shapes"] != shapes:
        differing = sorted(set(shapes) ^ set(state["shapes"])) or sorted(
            n for n in shapes if shapes[n] != state["shapes"][n])
        name = differing[0]
        raise CheckpointMismatch(
            f"{path} is from another model: parameter {name} is {state['shapes'].get(name, 'absent')} there "
            f"but {shapes.get(name, 'absent')} in model {config.model!r} ({len(differing)} parameter(s) differ)")
    current = to_dict(config)
    changed = sorted(k for k in current if k not in RESUME_FREE_KEYS and state["config"].get(k) != current[k])
    if changed:
        details = "; ".join(f"{k}: {state['config'].get(k)!r} -> {current[k]!r}" for k in changed)
        raise CheckpointMismatch(f"{path} was written with another config ({details}); resuming would not "
                                 "reproduce the run. Restore those values or start a new out_dir")
    written_by = state.get("world_size", 1)
    if world_size is not None and written_by != world_size:
        raise CheckpointMismatch(
            f"{path} was written by {written_by} process(es) and this run has {world_size}: micro_batch_size is per "
            "process, so the global batch would change. Resume with the same number of processes (torchrun "
            "--nproc_per_node), or scale micro_batch_size / grad_accum_steps and start a new out_dir")
    return state
