"""A new user's first hour: instant help that describes the commands and every config key, bad input
reported at its real source in one line, eval of a run from its own saved config, benchmark output
kept out of the working tree, and curves whose panels do not overlap."""
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from prefops.tools.cli import COMMANDS, main
from prefops.training import config as C, logs, loop as L, run as R

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model_config.hidden_size", "32", "--model_config.intermediate_size", "64", "--model_config.num_hidden_layers",
        "1", "--synthetic_size", "100", "--sft_steps", "1", "--steps", "2", "--micro_batch_size", "4",
        "--win_rate_samples", "8", "--eval_batches", "1", "--plot", "false", "--tensorboard", "false"]
HEAVY = ("torch", "transformers", "triton", "matplotlib")


def help_in_a_fresh_process(*args: str) -> tuple[str, list[str], float]:
    """The help text of `prefops ARGS --help`, the heavy modules it imported, and its wall time."""
    script = ("import sys\nfrom prefops.tools.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
              f"    pass\nprint('IMPORTED', *sorted(m for m in {HEAVY!r} if m in sys.modules))")
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script, *args, "--help"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    seconds = time.perf_counter() - began
    assert result.returncode == 0, result.stderr
    text, imported = result.stdout.rsplit("IMPORTED", 1)
    return text, imported.split(), seconds


def test_top_level_help_is_instant_and_describes_the_commands():
    text, imported, seconds = help_in_a_fresh_process()
    assert imported == []  # torch alone takes 2-20 s to import
    assert seconds < 10  # a Python start plus yaml; the bound leaves room for a loaded machine
    for name, (_, summary) in COMMANDS.items():
        assert f"  {name}" in text and summary in text
    assert "add_commands" not in text and "COMMAND_GROUPS" not in text  # no developer notes


@pytest.mark.parametrize("command", ["train", "eval", "bench", "compare"])
def test_command_help_imports_nothing_heavy(command):
    text, imported, _ = help_in_a_fresh_process(command)
    assert imported == []
    assert f"usage: prefops {command}" in text


def test_train_help_lists_every_key_with_its_default_and_meaning():
    text, _, _ = help_in_a_fresh_process("train")
    job = yaml.safe_load(C.default_path().read_text())
    for field in dataclasses.fields(C.Config):
        line = next((line for line in text.splitlines() if line.startswith(f"  {field.name} = ")), None)
        assert line is not None, f"{field.name} missing from `prefops train --help`"
        assert field.metadata["help"] in text
        value = job.get(field.name, getattr(C.Config(), field.name))
        assert line.split(" = ", 1)[1].startswith(C.as_yaml(value))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("text, line, message", [
    ("steps: 3\nbeta: [0.1\n", 3, "not valid YAML"),            # the parser reports the end of the file
    ("steps: 3\n  beta: 0.1\n", 2, "not valid YAML"),
    ("steps: 3\nbeta: high\n", 2, "beta must be of type float"),
    ("steps: 3\n\nlerning_rate: 1\n", 3, "unknown config key(s) lerning_rate"),
    ("steps: 0\n", 1, "steps must be a positive integer"),
])
def test_a_bad_config_file_is_named_with_its_line(tmp_path, capsys, text, line, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    assert main(["train", str(path)]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"prefops train: error: {path}:{line}") and message in err


@pytest.mark.parametrize("args, source, message", [
    (["--beta", "high"], "--beta high", "beta must be of type float"),
    (["--steps", "0"], "--steps 0", "steps must be a positive integer"),
    (["--lerning_rate", "1"], "--lerning_rate 1", "unknown config key(s) lerning_rate"),
    (["--loss_type", "[sigmoid"], "--loss_type [sigmoid", "not a YAML value"),
    (["--packing", "true", "--ld_alpha", "0.5"], "--packing true --ld_alpha 0.5", "ld_alpha needs padded batches"),
    (["--steps"], "--steps", "needs a value"),
])
def test_a_bad_override_is_named_as_given(capsys, args, source, message):
    assert main(["train", *args]) == 2
    err = one_error_line(capsys)
    assert f"error: {source}" in err and message in err
    assert "default.yaml" not in err  # the bundled file is not where the mistake is


@pytest.mark.parametrize("args, message", [
    (["--model_config.hidden_size", "x"], "model_config {hidden_size: x"),
    (["--model_config.num_attention_heads", "3"], "not a multiple of the number of attention heads"),
    (["--device", "gpu"], "device must be auto, cpu, cuda or cuda:N; got 'gpu'"),
    pytest.param(["--device", "cuda"], "device cuda: no CUDA GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="checks the message on a machine without a GPU")),
    (["--data", "nowhere.jsonl"], "nowhere.jsonl does not exist"),
])
def test_bad_values_found_when_the_run_starts_are_one_line_too(tmp_path, capsys, args, message):
    assert main(["train", *TINY, "--out_dir", str(tmp_path), *args]) == 2
    assert message in one_error_line(capsys)


def test_a_missing_config_file_is_named(capsys):
    assert main(["train", "nowhere.yaml"]) == 2
    assert one_error_line(capsys) == "prefops train: error: nowhere.yaml: no such config file"


def test_an_override_that_fixes_a_bad_file_is_accepted_and_a_good_file_keeps_its_blame(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("packing: true\nld_alpha: 0.5\n")
    assert C.load(path, {"packing": False}).ld_alpha == 0.5
    with pytest.raises(C.ConfigError, match=rf"^{path}: ld_alpha needs padded batches"):
        C.load(path, {"steps": 5})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("newcomer") / "run"
    assert main(["train", *TINY, "--beta", "0.2", "--out_dir", str(out_dir)]) == 0
    return out_dir


def test_eval_uses_the_config_the_run_saved(trained_run, capsys):
    capsys.readouterr()
    assert main(["eval", "--out_dir", str(trained_run)]) == 0  # no override repeated
    assert "[dpo eval 2]" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(trained_run / "last.pt"), "--win_rate_samples", "4"]) == 0
    assert main(["eval", "--checkpoint", str(trained_run / "sft.pt")]) == 0
    assert "[sft eval 1]" in capsys.readouterr().out


def test_eval_refuses_to_change_the_run_and_says_why(trained_run, capsys):
    assert main(["eval", "--out_dir", str(trained_run), "--beta", "0.5"]) == 2
    assert "--beta 0.5: eval uses the config the run was trained with" in one_error_line(capsys)
    assert main(["eval", "--out_dir", str(trained_run / "nowhere")]) == 2
    assert f"no checkpoint at {trained_run / 'nowhere' / 'last.pt'}" in one_error_line(capsys)
    assert main(["eval", "mine.yaml"]) == 2
    assert "eval takes no CONFIG.yaml" in one_error_line(capsys)


def test_threads_apply_to_the_run_and_are_restored(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    seen = []
    monkeypatch.setattr(L.Trainer, "_train", lambda self: seen.append(torch.get_num_threads()) or {})
    R.train(C.load(None, {"threads": 1, "out_dir": str(tmp_path)}))
    assert seen == [1] and torch.get_num_threads() == before


def test_bench_writes_under_the_ignored_runs_folder_and_labels_its_progress(capsys):
    import argparse
    from prefops.tools import bench, options

    subparsers = argparse.ArgumentParser().add_subparsers()
    options.add_commands(subparsers)
    out_dir = subparsers.choices["bench"].get_default("out_dir")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out_dir / "report.md")], cwd=ROOT)
    assert ignored.returncode == 0, f"{out_dir} is not git-ignored"

    options = argparse.Namespace(rows=["naive"], reps=1, warmup=0, forward_shapes=[])
    shape = bench.Shape(pairs=1, tokens=16, hidden=32, vocab=64, softcap=None)
    bench.bench_shape("run", shape, options, torch.device("cpu"), record_cpu=True)
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  ")]
    assert progress and all(":" in line and " ms" in line for line in progress), progress


def test_curves_put_each_stage_on_its_own_axes_with_labels():
    records = [{"stage": "sft", "kind": "train", "step": s, "loss": 2.0} for s in (1, 2)]
    records += [{"stage": "dpo", "kind": kind, "step": s, "loss": 0.5, "rewards/accuracies": 0.9,
                 "rewards/margins": 1.0, **({"win_rate": 0.5} if kind == "eval" else {})}
                for s in (1, 2) for kind in ("train", "eval")]
    figure = logs.curves_figure(records)
    axes = figure.axes
    assert [axis.get_title() for axis in axes] == ["SFT loss", "preference loss", "reward accuracy", "reward margin",
                                                  "scorer win rate"]
    assert all(axis.get_ylabel() and axis.get_xlabel() for axis in axes)
    assert max(axes[0].lines[0].get_ydata()) == 2.0 and max(axes[1].lines[0].get_ydata()) == 0.5  # not shared
