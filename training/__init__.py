"""prefops.training: a small DPO-family training loop on top of the fused losses.

The model body gives final hidden states; they go with the lm_head weight into
prefops.PreferenceLoss (pairwise losses) or prefops.sequence_objective (KTO, BCO),
so the N x V logits are never built. Runs on one device or under torchrun (FSDP2).

    from prefops import training
    config = training.load_config(None, {"steps": 50})   # the bundled default job
    summary = training.train(config)
"""
from .config import Config, load as load_config
from .data import DataError
from .checkpoint import CheckpointMismatch
from .loop import OutOfMemory, Trainer, evaluate, train

__all__ = ["Config", "load_config", "train", "evaluate", "Trainer", "DataError", "CheckpointMismatch", "OutOfMemory"]
