"""prefops: fused preference-optimisation losses that never build the N x V logits."""
import importlib
import os

# A source checkout put on the path without installing it (PYTHONPATH=<checkout>, as on a GPU
# box with no package index, or an editable install) finds prefops.kernels and prefops.training
# where pyproject.toml's package-dir puts them: kernels/ and training/ beside this folder. An
# installed prefops holds them inside and skips this.
#
# kernels/ has no __init__.py on purpose. From the checkout root (python -m pytest, python -c)
# the root is on sys.path, and a regular package there named `kernels` would shadow Hugging
# Face's `kernels`, which transformers imports. As a folder without __init__.py it is at most a
# namespace portion: any installed package of that name wins over it, and transformers reads a
# bare namespace as "not installed". tests/test_checkout_imports.py holds the line.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_checkout, "pyproject.toml")) and os.path.isfile(
        os.path.join(_checkout, "kernels", "logits_stats.py")):
    __path__.append(_checkout)

# Public name -> the submodule that defines it. Loaded on first use: importing prefops costs
# nothing until then, so `prefops --help` (prefops.tools.cli) answers without importing torch.
_EXPORTS = {
    **dict.fromkeys(("configure", "get_settings", "settings"), "config"),
    **dict.fromkeys(("SequenceStats", "sequence_count", "sequence_mean", "sequence_stats", "sequence_sum"),
                    "sequences"),
    **dict.fromkeys(("LogProbs", "linear_logprobs"), "ops"),
    **dict.fromkeys(("Objective", "sequence_logps", "sequence_objective"), "objective"),
    "PreferenceLoss": "preference",
    "UnpairedLoss": "unpaired",
    "ListwiseLoss": "listwise",
    **dict.fromkeys(("TokenKL", "linear_token_kl", "sequence_kl"), "token_kl"),
    **dict.fromkeys(("Diagnostics", "SequenceDiagnostics", "ches_scores", "linear_diagnostics",
                     "sequence_diagnostics"), "diagnostics"),
}
_SUBMODULES = ("reference", "losses", "shared_prompt", "strategy")

__all__ = [*_EXPORTS, *_SUBMODULES]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
