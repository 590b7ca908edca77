"""train(config): the job a config describes, offline (loop.Trainer) or with an `online:` section (online.py).

Its own module, so that loop.py, which online.py builds on, never imports online.py.
"""
from __future__ import annotations

from .loop import Trainer
from .online import OnlineTrainer


def train(config) -> dict:
    """Train as `config` says; the run's summary (also written to out_dir/summary.json)."""
    return (OnlineTrainer if config.online else Trainer)(config).train()
