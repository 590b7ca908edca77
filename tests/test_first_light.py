"""benchmarks/first_light.sh, the prepared GPU command: its CPU dry run, its time guard, its bars,
and the quick autotune it runs under."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import first_light  # noqa: E402

GIB = 1 << 30
PHASES = ("env", "smoke", "core", "peers", "families", "sweep", "training")


def bare_python(tmp_path):
    """This Python without site processing (-S): site-packages stay importable through PYTHONPATH, but the
    editable install's .pth finder never runs, so prefops is found only where first_light.sh puts it, as on
    a GPU box where nothing is installed."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    wrapper.chmod(0o755)
    site_paths = os.pathsep.join(dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib")))
    return wrapper, site_paths


@pytest.mark.slow
def test_cpu_dry_run_writes_every_log_and_the_summary(tmp_path):
    python, site_paths = bare_python(tmp_path)
    env = {**os.environ, "PYTHON": str(python), "PYTHONPATH": site_paths, "OUT": str(tmp_path / "out"),
           "FIRST_LIGHT_WHEELS": ""}
    env.pop("TRITON_INTERPRET", None)  # the script sets it for --device cpu
    hidden = subprocess.run([str(python), "-c", "import prefops"], env=env, cwd=tmp_path, capture_output=True,
                            text=True)
    assert "No module named 'prefops'" in hidden.stderr, "the bare Python must not see an installed prefops"

    begin = time.perf_counter()
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "first_light.sh"), "--device", "cpu", "--tiny"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - begin
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    out = tmp_path / "out"
    files = sorted(path.name for path in out.iterdir())
    assert files == ["first-light.log", "results.jsonl", "summary.md"], "the device tool returns at most 8 files"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    phases = {r["phase"]: r["rc"] for r in records if r.get("kind") == "phase"}
    assert phases == dict.fromkeys(PHASES, 0), phases
    log = (out / "first-light.log").read_text()
    assert re.findall(r"^== (\w+): at most \d+ s$", log, re.MULTILINE) == list(PHASES), "in order, most valuable first"
    assert all(f"phase={phase}" in log for phase in PHASES)

    checks = {r["check"]: r for r in records if "check" in r}
    assert str(ROOT / "kernels") in checks["prefops"]["detail"]
    assert "strategy=" in checks["prefops settings"]["detail"]
    for name in ("triton kernel", "fused.matmul_fp32", "linear_logprobs aligned", "linear_logprobs odd",
                 "DPO default", "DPO lean", "DPO budget", "repeat deterministic"):
        assert checks[name]["ok"], checks[name]
    rows = {(r["shape"], r["row"]): r for r in records if r.get("kind") == "row"}
    for shape, key in [(s, k) for k, where in first_light.CORE_ROWS.items() for s in where]:
        row = rows[(shape, key)]
        assert row["ms"] is not None and row["beyond"] is not None, row
        assert all(float(error) < 2e-2 for error in row["errors"]), row
        assert (row["path"] is not None) == (key != "naive"), row
    trl_row = rows[("A", "trl")]
    if importlib.util.find_spec("trl") is None:
        assert trl_row["reason"].startswith("skipped"), trl_row
    else:
        # Its tiles hold bf16 logits, as the naive row's do: about 5e-3 here, and O(1) if the adapter is wrong.
        assert trl_row["ms"] is not None and all(float(error) < 2e-2 for error in trl_row["errors"]), trl_row
    forward = [r for r in records if r.get("kind") == "forward" and r["op"] == first_light.CORE_FORWARD[1]]
    assert [r["shape"] for r in forward if r["ms"]] == list("AQL")

    families = {(r["family"], r["row"]): r for r in records if r.get("kind") == "family"}
    assert set(families) == {(family, key) for family, keys in first_light.FAMILY_ROWS.items()
                             for key in ("floor", *keys)}, families
    for (family, key), row in families.items():
        assert row["ms"] is not None and not row["reason"], row
        if key != "floor":
            assert all(float(error) < 2e-2 for error in row["errors"]) and row["path"], row
    configs = [r for r in records if r.get("kind") == "config"]
    assert {r["kernel"] for r in configs if r.get("ms")} >= {"logits_stats_kernel", "logits_grad_kernel"}, configs
    assert {r["shape"] for r in configs} == {"A"}
    steps = {r["row"]: r for r in records if r.get("kind") == "training"}
    assert list(steps) == list(first_light.TRAINING_ROWS)
    for row in ("prefops", "naive") + (("trl",) if importlib.util.find_spec("trl") else ()):
        assert steps[row]["tokens_per_s"] > 0 and steps[row]["step_peak"] > 0, steps[row]

    summary = (out / "summary.md").read_text()
    assert "CPU DRY RUN" in summary and "Bars passed:" in summary
    bars = [line for line in summary.split("## Bars")[1].split("##")[0].splitlines() if line.startswith("| ")][1:]
    judged = [line for line in bars if "trl" not in line or importlib.util.find_spec("trl")]
    assert len(bars) == 15 and all(line.endswith(("| pass |", "| FAIL |")) for line in judged), bars
    assert summary.count("| lean <= 1.45x floor, <= 0.25 GB |") == 3
    assert "| default <= 1.45x floor, <= 2.0 GB | L |" in summary
    assert "logits_grad_kernel at A:" in summary, "the kernel sweep's table"
    assert summary in done.stdout, "the summary comes last on stdout: the device tool returns the output's tail"
    print(f"dry run: {seconds:.0f} s")


def test_a_step_starts_only_with_its_time_left(tmp_path):
    for phase in ("peers", "families", "training"):
        assert first_light.main([phase, "--out", str(tmp_path), "--device", "cpu", "--tiny",
                                 "--deadline", str(time.time() + 5)]) == 0
    first_light.main(["summary", "--out", str(tmp_path), "--tiny"])
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    skipped = 1 + sum(map(len, first_light.FAMILY_ROWS.values())) + len(first_light.TRAINING_ROWS)
    assert [r["reason"][:22] for r in records if r["kind"] in ("shape", "family", "training")] == \
        ["skipped: out of time ("] * skipped
    assert not [r for r in records if r["kind"] in ("floor", "forward") or r.get("ms")]
    summary = (tmp_path / "summary.md").read_text()
    assert "| lean <= 1.45x floor, <= 0.25 GB | A | not run | not run |" in summary
    assert "| TDPO2 default <= 1.6x its 4-GEMM floor | A | skipped: out of time (" in summary
    assert "| 1B tokens/s >= 1.03x trl | 4x2048 | skipped: out of time (" in summary
    assert "Bars passed: 0 of 15; failed: 0; not run: 15." in summary


def fwdbwd(shape, row, ratio, gib, notes=(), path="stored"):
    return {"phase": "core", "kind": "row", "shape": shape, "row": row, "label": row, "ms": 10.0 * ratio,
            "floor_ms": 10.0, "beyond": None if gib is None else int(gib * GIB), "errors": ["1e-6"] * 3,
            "reason": None, "notes": list(notes), "note": "", "path": path}


def family(name, row, ms, floor_ms=10.0, notes=()):
    return {"phase": "families", "kind": "family", "family": name, "row": row, "label": row, "ms": ms,
            "floor_ms": floor_ms, "beyond": None, "errors": ["1e-6"] * 3, "reason": None, "notes": list(notes),
            "path": "stored"}


def step(row, tokens_per_s, peak_gib, reason=None):
    return {"phase": "training", "kind": "training", "row": row, "batch": "4 x 2048", "ms": 1.0,
            "tokens_per_s": tokens_per_s, "step_peak": None if peak_gib is None else int(peak_gib * GIB),
            "loss": 0.69, "reason": reason, "path": None}


@pytest.mark.parametrize("record, ratio_bar, gib_bar, verdict", [
    (fwdbwd("A", "default", 1.14, 1.9), 1.15, 2.0, "pass"),
    (fwdbwd("A", "default", 1.16, 1.9), 1.15, 2.0, "FAIL"),
    (fwdbwd("L", "default", 1.44, 2.1), 1.45, 2.0, "FAIL"),
    (fwdbwd("A", "lean", 1.44, 0.24), 1.45, 0.25, "pass"),
    (fwdbwd("A", "lean", 1.44, None), 1.45, 0.25, "FAIL"),  # no memory figure is no pass
    # A fallback's warning: the path the bar is about did not run.
    (fwdbwd("A", "default", 1.10, 0.9, ["warning: a loss group does not fit the memory budget"]), 1.15, 2.0, "FAIL"),
    (family("tdpo", "default", 15.9), 1.6, None, "pass"),  # the families' bars are on time alone
    (None, 1.6, None, "not run"),
])
def test_bar_verdicts(record, ratio_bar, gib_bar, verdict):
    assert first_light.bar_verdict(record, ratio_bar, gib_bar)[0] == verdict


def test_training_and_head_verdicts():
    compare = first_light.compare_verdict
    assert compare(step("prefops", 39400, 9.2), step("trl", 38200, 9.2), "tokens_per_s", 1.03) == \
        ("1.031x (39,400 / 38,200)", "pass")
    assert compare(step("prefops", 38500, 9.2), step("naive", 35700, 26.3), "tokens_per_s", 1.08)[1] == "FAIL"
    assert compare(step("prefops", 1, 9.2), step("trl", 1, 9.2), "step_peak", None) == ("9.20 / 9.20 GB", "pass")
    assert compare(step("prefops", 1, 9.3), step("trl", 1, 9.2), "step_peak", None)[1] == "FAIL"
    assert compare(step("prefops", 1, 9.2), step("trl", None, None, "skipped: No module named 'trl'"),
                   "tokens_per_s", 1.03) == ("trl: skipped: No module named 'trl'", "not run")
    assert compare(step("prefops", None, None, "failed: OOM"), step("trl", 1, 1), "step_peak", None) == \
        ("failed: OOM", "FAIL")
    assert first_light.head_verdict(family("head", "default", 10.2), family("head", "logps-default", 10.0))[1] == \
        "pass"
    assert first_light.head_verdict(family("head", "default", 10.4), family("head", "logps-default", 10.0))[1] == \
        "FAIL"
    assert first_light.head_verdict(None, family("head", "logps-default", 10.0)) == ("not run", "not run")


def test_summary_reads_the_forward_bar_from_its_own_baseline(tmp_path):
    records = [fwdbwd("A", "lean", 1.40, 0.2, path="lean"),
               {"phase": "core", "kind": "forward", "shape": "A", "op": first_light.CORE_FORWARD[1], "ms": 10.5,
                "base_ms": 10.0, "reason": None, "path": "sliced"},
               # The peers phase times its own baseline; it must not stand in for the core phase's.
               {"phase": "peers", "kind": "forward", "shape": "A", "op": first_light.FORWARD_BASE, "ms": 5.0,
                "base_ms": 5.0, "reason": None},
               family("listwise", "default", 13.0), step("prefops", 39400, 9.2), step("trl", 38200, 9.2)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    first_light.main(["summary", "--out", str(tmp_path)])
    summary = (tmp_path / "summary.md").read_text()
    assert "| forward-only <= 1.1x one GEMM | A | 1.05x (10.50 / 10.00 ms), path sliced | pass |" in summary
    assert "| lean <= 1.45x floor, <= 0.25 GB | A | 1.40x, 0.20 GB, path lean | pass |" in summary
    assert "| listwise (2x4x1024) default <= 1.2x floor | A | 1.30x, path stored | FAIL |" in summary
    assert "| 1B tokens/s >= 1.08x naive | 4x2048 | peer not run | not run |" in summary
    assert "Bars passed: 4 of 15; failed: 1; not run: 10." in summary


def test_quick_autotune_keeps_the_first_two_configs(monkeypatch):
    from prefops.kernels import config
    monkeypatch.setattr(config, "interpreting", lambda: False)
    for make in (config.stats_configs, config.grad_configs, config.pair_configs):
        monkeypatch.delenv("PREFOPS_AUTOTUNE", raising=False)
        full = [str(c) for c in make()]
        monkeypatch.setenv("PREFOPS_AUTOTUNE", "quick")
        assert [str(c) for c in make()] == full[:2] and len(full) > 2
    monkeypatch.setenv("PREFOPS_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="PREFOPS_AUTOTUNE must be one of full, quick; got 'fast'"):
        config.stats_configs()
