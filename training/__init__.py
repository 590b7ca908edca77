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
import os
import sys

if __name__ != "prefops.training":
    # Imported as a top-level `training`: the checkout root is on sys.path (python -m, python -c
    # started there). This folder is prefops.training alone, so the name goes to whatever would
    # have it without the checkout, an installed distribution or nothing, and the import system
    # returns the module left in sys.modules. tests/test_checkout_imports.py holds the line.
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = PathFinder.find_spec(__name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    sys.modules[__name__] = module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[__name__])

# Public name -> (submodule, its name there), loaded on first use so that the command line's
# help and config parsing (prefops.training.cli, .config) do not import torch and transformers.
_EXPORTS = {
    "Config": ("config", "Config"), "load_config": ("config", "load"), "ConfigError": ("config", "ConfigError"),
    "DataError": ("data", "DataError"), "CheckpointMismatch": ("checkpoint", "CheckpointMismatch"),
    **{name: ("loop", name) for name in ("OutOfMemory", "Trainer", "evaluate")}, "train": ("run", "train"),
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
