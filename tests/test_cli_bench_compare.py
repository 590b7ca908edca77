"""`prefops bench` and `prefops compare`: exit statuses, messages and outputs."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefops.tools import bench, compare
from prefops.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_compare_subset_passes(capsys):
    only = "op/linear_logprobs,objective/lean,pairwise/sigmoid,pairwise/sigmoid+wpo/budget,unpaired/kto/lean,diffusion"
    assert main(["compare", "--only", only, "--seed", "3"]) == 0
    out = capsys.readouterr().out
    for name in ("op/linear_logprobs", "pairwise/sigmoid/lean", "pairwise/sigmoid/budget", "diffusion/mapo"):
        assert f"| {name} |" in out
    assert "FAIL" not in out


def test_compare_bfloat16_subset_passes(capsys):
    assert main(["compare", "--only", "op,pairwise/ipo/lean", "--dtype", "bfloat16"]) == 0
    assert "op/linear_logprobs+bias" in capsys.readouterr().out


def _broken(entry, fused):
    return {entry.name: dataclasses.replace(entry, fused=fused)}


@pytest.mark.parametrize("how", ["scaled", "nan", "raises", "detached"])
def test_compare_fails_on_a_broken_entry(monkeypatch, capsys, how):
    """A fused path off by 1e-4, NaN, raising or losing its gradient must make compare exit 1."""
    entry = compare.entries()["op/linear_logprobs"]

    def fused(hidden, weight, targets):
        logp = entry.fused(hidden, weight, targets)["logp"]
        if how == "raises":
            raise RuntimeError("kernel exploded")
        return {"logp": {"scaled": logp * (1 + 1e-4), "nan": logp + float("nan"),
                         "detached": logp.detach() + 0 * hidden.sum()}[how]}

    monkeypatch.setattr(compare, "entries", lambda: _broken(entry, fused))
    assert main(["compare"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "FAILED: 1 of 1 entry: op/linear_logprobs (" in out
    assert ("error" if how == "raises" else "over tolerance") in out.splitlines()[-1]
    if how == "raises":
        assert "kernel exploded" in out


def _row(out, name):
    return next(line for line in out.splitlines() if line.startswith(f"| {name} |")).split(" | ")


def test_compare_shows_a_fallback_and_its_warning_as_a_note(capsys):
    """AOT couples the pairs, so its budget entry runs lean: the table says so, the warning is a note
    of the report (not raw stderr), and the summary names the fallback."""
    assert main(["compare", "--only", "pairwise/aot/budget,pairwise/sigmoid/budget"]) == 0
    captured = capsys.readouterr()
    aot, sigmoid = _row(captured.out, "pairwise/aot/budget"), _row(captured.out, "pairwise/sigmoid/budget")
    assert aot[1] == "lean (budget asked)" and aot[7] == "[1]"
    assert sigmoid[1] in ("stored", "chunked") and sigmoid[7] == ""
    assert "[1] UserWarning: loss_type 'aot' couples the pairs" in captured.out
    assert "lean where budget is asked: pairwise/aot/budget, as the loss couples the pairs" in captured.out
    assert "Warning" not in captured.err


@pytest.mark.parametrize("how", ["budget ran lean", "lean ran budget"])
def test_compare_fails_when_an_entry_runs_another_strategy(monkeypatch, capsys, how):
    """A budget run that silently falls back to lean (its plan says no group fits), or a lean entry
    that runs budget, fails however close its numbers are."""
    all_entries = compare.entries()
    if how == "budget ran lean":
        entry = all_entries["objective/budget"]
        monkeypatch.setattr("prefops.objective.plan_budget", lambda *args, **kwargs: None)
    else:
        entry = dataclasses.replace(all_entries["pairwise/sigmoid/lean"],
                                    fused=all_entries["pairwise/sigmoid/budget"].fused)
    monkeypatch.setattr(compare, "entries", lambda: {entry.name: entry})
    assert main(["compare"]) == 1
    out = capsys.readouterr().out
    asked = entry.strategy
    row = _row(out, entry.name)
    ran = row[1].split(" ")[0]
    assert ran == ("lean" if asked == "budget" else "chunked")
    expected = "stored or chunked" if asked == "budget" else "lean"
    assert row[1] == f"{ran} ({asked} asked)" and row[5] == f"FAIL; ran {ran}, not {expected}"
    assert out.splitlines()[-1] == f"FAILED: 1 of 1 entry: {entry.name} (ran {ran}, not {expected})"
    if how == "budget ran lean":
        assert "does not fit the memory budget" in out  # the fallback's warning, as a note


def test_compare_summary_states_the_tolerances_used(capsys):
    """mapo is held to its own 1e-4: the table and the summary say so, rather than 'all within 1e-05'."""
    assert main(["compare", "--only", "diffusion,op/linear_logprobs"]) == 0
    out = capsys.readouterr().out
    assert _row(out, "diffusion/mapo")[4] == "1.0e-04 / 1.0e-04"
    assert _row(out, "op/linear_logprobs")[4] == "1.0e-05 / 1.0e-05"
    assert ("at 1e-05 on values, 1e-05 on gradients (diffusion/diffusion_dpo, op/linear_logprobs) and 0.0001 on "
            "values, 0.0001 on gradients (diffusion/mapo)." in out)
    assert "where an entry chooses one" not in out  # none of these does
    assert out.splitlines()[-1] == "passed: all 3 entries"


def test_compare_bfloat16_holds_values_at_the_fp32_accumulation_level(capsys):
    """bf16 inputs: values to 1e-5 (fp32 logits, never rounded), gradients (stored in bf16) to 3 bf16 units."""
    assert main(["compare", "--dtype", "bfloat16", "--only", "op/linear_logprobs,pairwise/sigmoid"]) == 0
    out = capsys.readouterr().out
    assert _row(out, "pairwise/sigmoid/budget")[1] in ("stored", "chunked")
    assert _row(out, "op/linear_logprobs")[4] == f"1.0e-05 / {3 * 2.0**-8:.1e}"


def test_compare_entries_that_name_a_strategy_expect_one():
    """Every entry named after a strategy is checked for the path that ran."""
    for name, entry in compare.entries().items():
        if name.endswith(("/lean", "/budget", "/sliced", "/auto")):
            assert entry.strategy == name.rsplit("/", 1)[1], name


def test_compare_unknown_entry_names_the_families(capsys):
    assert main(["compare", "--only", "pairwise/nonsense"]) == 2
    err = capsys.readouterr().err
    assert "no entry named 'pairwise/nonsense'" in err and "pairwise" in err and "op" in err


def test_compare_bad_options_exit_2(capsys):
    assert main(["compare", "--only", "op", "--seed", "1", "--no-such-option"]) == 2
    assert "unrecognised arguments: --no-such-option" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["compare", "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_compare_registry_covers_every_pairwise_loss_and_both_strategies():
    names = set(compare.entries())
    from prefops.losses import LOSSES
    for loss_type in LOSSES:
        assert {f"pairwise/{loss_type}/lean", f"pairwise/{loss_type}/budget"} <= names
    assert {"unpaired/kto/lean", "unpaired/bco/budget", "diffusion/diffusion_dpo", "objective/budget"} <= names


def test_bench_unknown_preset_lists_the_valid_ones(capsys):
    assert main(["bench", "--model-config", "llama-9000", "--device", "cpu", "--tiny"]) == 2
    err = capsys.readouterr().err
    assert "llama-9000" in err and all(name in err for name in bench.PRESETS)
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_bench_without_gpu_says_so(capsys):
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--device cpu --tiny" in err


def test_model_dims_from_presets_and_hf_configs(tmp_path):
    assert bench.model_dims("gemma2-9b") == (3584, 256000, 30.0)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 96, "vocab_size": 517, "final_logit_softcapping": 12.5}))
    assert bench.model_dims(str(config)) == (96, 517, 12.5)
    assert bench.model_dims(str(tmp_path)) == (96, 517, 12.5)  # the folder holding config.json
    config.write_text(json.dumps({"text_config": {"hidden_size": 64, "vocab_size": 300}}))
    assert bench.model_dims(str(config)) == (64, 300, None)
    config.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match="vocab_size"):
        bench.model_dims(str(config))


def test_bench_cpu_tiny_writes_table_and_plots(tmp_path, capsys):
    args = ["bench", "--device", "cpu", "--tiny", "--model-config", "gemma2-9b", "--rows", "naive,lean,budget",
            "--tokens", "64", "--seq-len", "32", "--reps", "1", "--warmup", "0", "--seq-lens", "16,32",
            "--out-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "softcap 30" in out and "| run | prefops lean |" in out and "T=32: ms / GB" in out
    lean = next(line for line in out.splitlines() if line.startswith("| run | prefops lean |")).split(" | ")
    assert float(lean[5]) <= 1e-4  # loss error of a bf16 run against the fp32 reference
    assert (tmp_path / "report.md").read_text().strip() == out.strip()
    for name in ("time_vs_seq_len.png", "memory_vs_seq_len.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_shapes(tmp_path, capsys):
    assert main(["bench", "--device", "cpu", "--tiny", "--tokens", "10", "--out-dir", str(tmp_path)]) == 2
    assert "--tokens must hold at least one pair" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--tiny", "--rows", "naive,fast", "--out-dir", str(tmp_path)]) == 2
    assert "unknown fast" in capsys.readouterr().err


def test_bench_core_script_still_runs():
    """The results-log script is a thin layer over prefops.tools.bench; its smoke mode must keep working."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_core.py"), "--device", "cpu", "--tiny", "--shapes", "A",
         "--rows", "naive,lean", "--reps", "1", "--warmup", "0", "--forward-shapes", ""],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "| A | prefops lean |" in result.stdout


def test_reports_name_the_tiles_the_autotuner_chose(capsys):
    triton = pytest.importorskip("triton")
    from prefops.tools.bench import finish_report
    from prefops.kernels import logits_stats

    key = (4096, 128256, False, 0, False, False, False)
    logits_stats.logits_stats_kernel.cache[key] = triton.Config({"BLOCK_N": 128, "BLOCK_V": 128}, num_warps=8)
    try:
        finish_report("# report", None)
    finally:
        del logits_stats.logits_stats_kernel.cache[key]
    printed = capsys.readouterr().out
    assert "Autotuner picks:" in printed and f"logits_stats_kernel {key}: BLOCK_N: 128, BLOCK_V: 128" in printed


def test_bench_options_name_every_row():
    """`prefops bench --rows` is defined without importing torch, from names that must match the rows."""
    from prefops.tools.options import ROW_NAMES

    assert ROW_NAMES == tuple(bench.ROWS)
