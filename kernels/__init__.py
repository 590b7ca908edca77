"""Triton kernels (imported as prefops.kernels). Each file holds one kernel and its launcher."""
from .logits_grad import launch_logits_grad
from .logits_stats import launch_logits_stats
from .rows_grad import launch_rows_grad
from .rows_kl import launch_rows_kl_grad, launch_rows_kl_stats
from .rows_stats import launch_rows_stats
from .token_kl_grad import launch_token_kl_grad
from .token_kl_stats import launch_token_kl_stats

__all__ = ["launch_logits_grad", "launch_logits_stats", "launch_rows_grad", "launch_rows_kl_grad",
           "launch_rows_kl_stats", "launch_rows_stats", "launch_token_kl_grad", "launch_token_kl_stats"]
