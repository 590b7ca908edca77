"""Work started in the checkout root imports nothing of the checkout under a top-level name.

From the root (python -m pytest, python -m ..., python -c ...) the root is sys.path[0]. A regular
package there named like an installed distribution wins over it: kernels/ used to shadow
Hugging Face's `kernels`, which transformers >= 5.25 imports, and every model load failed. Each
case runs in a subprocess from the root: the import cases with a stand-in distribution for each
top-level folder in a temporary site folder (on PYTHONPATH, so after the root on sys.path, as
site-packages is), the model-loading ones with the environment's own packages.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL_FOLDERS = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier()
                           and not p.name.startswith((".", "_")))


def run_from_root(code_or_args, site: Path | None, timeout=300):
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def stand_ins(tmp_path):
    """A site folder with a distribution named after each top-level folder of the checkout; the
    `kernels` one defines what transformers.integrations.hub_kernels imports from it."""
    for name in TOP_LEVEL_FOLDERS:
        package = tmp_path / name
        package.mkdir()
        (package / "__init__.py").write_text(
            "INSTALLED = True\n__version__ = '0.19.1'\n"
            "class _Any:\n    def __init__(self, *a, **k): pass\n"
            "def __getattr__(name):\n    return _Any\n")
    return tmp_path


def test_the_layout_is_what_this_test_covers():
    assert {"kernels", "training", "prefops"} <= set(TOP_LEVEL_FOLDERS)


@pytest.mark.parametrize("name", [n for n in TOP_LEVEL_FOLDERS if n != "prefops"])
def test_an_installed_distribution_wins_over_the_checkout_folder(stand_ins, name):
    result = run_from_root(f"import {name}; print({name}.INSTALLED, {name}.__file__)", stand_ins)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("True"), result.stdout


@pytest.mark.parametrize("name", [n for n in TOP_LEVEL_FOLDERS if n != "prefops"])
def test_without_one_no_checkout_code_runs_under_the_name(name):
    """Nothing installed under the name (site-packages left out, where Hugging Face's `kernels`
    is): the import either fails as in a clean environment or finds a bare namespace (no
    __file__, which transformers reads as not installed); never a module of the checkout."""
    result = run_from_root(
        f"import importlib, sys\n"
        f"sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
        f"try:\n    m = importlib.import_module({name!r})\nexcept ModuleNotFoundError:\n    print('absent')\n"
        f"else:\n    print(getattr(m, '__file__', None))", None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("absent", "None"), result.stdout


def test_prefops_keeps_its_kernels_and_training(stand_ins):
    result = run_from_root("import prefops.kernels.logits_stats, prefops.training as t; import kernels, training;"
                           "print(t.load_config.__module__, kernels.INSTALLED, training.INSTALLED)", stand_ins)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["prefops.training.config", "True", "True"]


@pytest.mark.slow
def test_transformers_and_trl_load_models_from_the_root():
    """With the environment's own packages (transformers >= 5.25 brings Hugging Face's `kernels`)."""
    pytest.importorskip("trl")
    result = run_from_root(
        "from transformers import AutoModelForCausalLM, LlamaConfig; from trl import DPOTrainer\n"
        "from prefops.integrations.trl import PrefopsDPOTrainer, PrefopsOnlineDPOTrainer\n"
        "config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,"
        " vocab_size=50)\n"
        "print(type(AutoModelForCausalLM.from_config(config)).__name__)", None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "LlamaForCausalLM"


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["-m", "prefops.tools.demo"],
    ["-m", "prefops.tools.cli", "compare", "--only", "pairwise/sigmoid"],
    ["-m", "prefops.tools.cli", "train", "--sft_steps", "2", "--steps", "2", "--eval_every", "2",
     "--synthetic_size", "200", "--micro_batch_size", "8"],
], ids=["demo", "compare", "train"])
def test_the_readme_commands_run_from_the_root(tmp_path, args):
    if args[-1] == "8":
        args = [*args, "--out_dir", str(tmp_path / "run")]
    result = run_from_root(args, None, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
