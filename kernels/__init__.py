"""Triton kernels (imported as prefops.kernels). Each file holds one kernel and its launcher."""
from .logits_grad import launch_logits_grad
from .logits_stats import launch_logits_stats

__all__ = ["launch_logits_grad", "launch_logits_stats"]
