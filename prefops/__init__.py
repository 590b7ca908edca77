"""prefops: fused preference-optimisation losses that never build the N x V logits."""
import os

# A source checkout put on the path without installing it (PYTHONPATH=<checkout>, as on a GPU
# box with no package index) finds prefops.kernels and prefops.training where pyproject.toml's
# package-dir puts them: kernels/ and training/ beside this folder. An installed prefops holds
# them inside and skips this.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_checkout, "pyproject.toml")) and os.path.isfile(
        os.path.join(_checkout, "kernels", "__init__.py")):
    __path__.append(_checkout)

from .config import configure, get_settings, settings
from .sequences import SequenceStats, sequence_count, sequence_mean, sequence_stats, sequence_sum
from . import reference
from .ops import LogProbs, linear_logprobs
from .objective import Objective, sequence_logps, sequence_objective
from .preference import PreferenceLoss
from .unpaired import UnpairedLoss
from .listwise import ListwiseLoss
from .token_kl import TokenKL, linear_token_kl, sequence_kl
from .diagnostics import Diagnostics, SequenceDiagnostics, ches_scores, linear_diagnostics, sequence_diagnostics
from . import losses, shared_prompt

__all__ = [
    "configure", "get_settings", "settings", "reference", "LogProbs", "linear_logprobs", "Objective", "sequence_objective", "sequence_logps", "PreferenceLoss", "UnpairedLoss", "ListwiseLoss", "losses",
    "TokenKL", "linear_token_kl", "sequence_kl", "shared_prompt",
    "Diagnostics", "SequenceDiagnostics", "ches_scores", "linear_diagnostics", "sequence_diagnostics",
    "SequenceStats", "sequence_count", "sequence_mean", "sequence_stats", "sequence_sum",
]
