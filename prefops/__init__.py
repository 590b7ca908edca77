"""prefops: fused preference-optimisation losses that never build the N x V logits."""
from .config import configure, get_settings, settings
from .sequences import SequenceStats, sequence_count, sequence_mean, sequence_stats, sequence_sum
from . import reference

__all__ = [
    "configure", "get_settings", "settings", "reference",
    "SequenceStats", "sequence_count", "sequence_mean", "sequence_stats", "sequence_sum",
]
