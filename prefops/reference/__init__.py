"""Plain PyTorch references: materialise the logits, then compute the naive way.

Everything the fused ops compute has a reference here, one module per family.
They are simple on purpose and use O(N x V) memory; tests and benchmarks
compare against them. Pass float64 inputs for a high-precision reference.
"""
from .diagnostics import ches_scores, linear_diagnostics
from .logprobs import linear_logprobs, logits, token_metrics, token_sum_p2
from .token_kl import linear_token_kl

__all__ = ["logits", "linear_logprobs", "token_sum_p2", "token_metrics", "linear_diagnostics", "ches_scores", "linear_token_kl"]
