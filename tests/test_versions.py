"""Version combinations the package cannot run on are named before they fail obscurely."""
import importlib
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import triton

import prefops.versions as versions
from prefops.fused import check_interpreter_versions


@pytest.mark.parametrize("triton_version,numpy_version,fails", [
    ("3.6.0", "2.4.1", True),   # the GPU box's triton with a current numpy: every interpreted launch fails
    ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.1", False),
    ("3.9.0", "3.0.0", False),
])
def test_interpreter_version_guard(monkeypatch, triton_version, numpy_version, fails):
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    if fails:
        with pytest.raises(RuntimeError, match=r"numpy<2.4.*triton>=3.7"):
            check_interpreter_versions()
    else:
        check_interpreter_versions()


def test_this_environment_passes_the_guard():
    check_interpreter_versions()


# ----------------------------------------------------------------------------- the floors of pyproject.toml


def installed_as(monkeypatch, package, version):
    """The guards see `package` at `version` (None: not installed); every other package as it is."""
    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda name: version if name == package else real(name))


def floor_message(feature, package, minimum, seen):
    have = "is not installed" if seen is None else f"{re.escape(seen)} is installed"
    return (f"{re.escape(feature)}.* needs {package} >= {re.escape(minimum)}; {package} {have}: "
            f"pip install '{package}>={re.escape(minimum)}'")


@pytest.mark.parametrize("text,expected", [("5.4.0", (5, 4, 0)), ("5.4", (5, 4)), ("2.4.0rc1", (2, 4, 0)),
                                           ("2.13.0+cpu", (2, 13, 0)), ("1.15.0.dev0", (1, 15, 0))])
def test_release_reads_the_numeric_parts(text, expected):
    assert versions.release(text) == expected


def test_prefops_attention_names_its_transformers_floor(monkeypatch):
    import prefops.attention as attention

    installed_as(monkeypatch, "transformers", "5.3.0")  # its mask interface passes cache_position: every call fails
    with pytest.raises(ImportError, match=floor_message("attn_implementation='prefops'", "transformers", "5.4",
                                                        "5.3.0")):
        attention.register()


def test_padding_free_batches_name_their_transformers_floor(monkeypatch):
    from prefops.integrations import hf

    installed_as(monkeypatch, "transformers", "4.53.3")
    with pytest.raises(ImportError, match=floor_message("a padding-free batch", "transformers", "4.54", "4.53.3")):
        hf._check_packed_attention()


@pytest.mark.parametrize("seen", ["1.14.2", None])
def test_trl_drop_ins_name_their_trl_floor(monkeypatch, seen):
    installed_as(monkeypatch, "trl", seen)
    monkeypatch.delitem(sys.modules, "prefops.integrations.trl", raising=False)  # imported afresh, restored after
    with pytest.raises(ImportError, match=floor_message("prefops.integrations.trl", "trl", "1.15", seen)):
        importlib.import_module("prefops.integrations.trl")


def test_ofs_dpo_names_its_peft_floor(monkeypatch):
    from prefops.training import adapters

    installed_as(monkeypatch, "peft", "0.17.1")  # imports transformers' HybridCache, gone in transformers 5
    with pytest.raises(ImportError, match=floor_message("ofs_dpo", "peft", "0.18", "0.17.1")):
        adapters.add_adapters(None, None)


def test_this_environment_passes_the_floors():
    import prefops.attention as attention

    assert attention.register() == attention.NAME
    for package, minimum in (("transformers", versions.TRANSFORMERS_ATTENTION), ("trl", versions.TRL_DROP_INS),
                             ("peft", versions.PEFT_ADAPTERS)):
        versions.require(package, minimum, "the test extra")
    importlib.import_module("prefops.integrations.trl")


def test_pyproject_states_the_floors_the_guards_check():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    stated = {}
    for requirement in [*project["dependencies"], *(r for extra in project["optional-dependencies"].values()
                                                    for r in extra)]:
        name, _, floor = re.match(r"([A-Za-z0-9_.-]+)\s*(>=\s*([0-9.]+))?", requirement).groups()
        stated.setdefault(name, set()).add(floor)
    assert stated["transformers"] == {versions.TRANSFORMERS_ATTENTION}
    assert stated["trl"] == {versions.TRL_DROP_INS}
    assert stated["peft"] == {versions.PEFT_ADAPTERS}


def test_the_guards_import_nothing_heavy():
    code = ("import sys, prefops, prefops.versions as v; v.require('pip', '1', 'x'); "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
