"""prefops.training: a small DPO-family training loop on top of the fused losses.

The model body gives final hidden states; they go with the lm_head weight into
prefops.PreferenceLoss (pairwise losses) or prefops.sequence_objective (KTO, BCO),
so the N x V logits are never built. Runs on one device or under torchrun (FSDP2).

    from prefops import training
    config = training.load_config(None, {"steps": 50})   # the bundled default job
    summary = training.train(config)

Online rounds (sample, judge, pair, train) take an `online` section, and from Python any judge:

    config = training.load_config("training/configs/online.yaml")
    summary = training.OnlineTrainer(config, judge=lambda prompts, completions: [...]).train()
"""
import importlib

# Public name -> (submodule, its name there), loaded on first use so that the command line's
# help and config parsing (prefops.training.cli, .config) do not import torch and transformers.
_EXPORTS = {
    "Config": ("config", "Config"), "load_config": ("config", "load"), "ConfigError": ("config", "ConfigError"),
    "DataError": ("data", "DataError"), "CheckpointMismatch": ("checkpoint", "CheckpointMismatch"),
    **{name: ("loop", name) for name in ("OutOfMemory", "Trainer", "evaluate", "train")},
    "OnlineTrainer": ("online", "OnlineTrainer"),
}

__all__ = ["Config", "ConfigError", "load_config", "train", "evaluate", "Trainer", "OnlineTrainer", "DataError",
           "CheckpointMismatch", "OutOfMemory"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value
    return value
