"""benchmarks/first_light.sh, the prepared GPU command: its CPU dry run, its time guard, its bars,
and the quick autotune it runs under."""
import importlib.util
import json
import os
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
    assert files == ["core.log", "env.log", "peers.log", "results.jsonl", "smoke.log", "summary.md"]
    assert len(files) <= 8, "the device tool returns at most 8 files"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    phases = {r["phase"]: r["rc"] for r in records if r.get("kind") == "phase"}
    assert phases == {"env": 0, "smoke": 0, "core": 0, "peers": 0}, phases
    for phase in phases:
        assert f"phase={phase}" in (out / f"{phase}.log").read_text()

    checks = {r["check"]: r for r in records if "check" in r}
    assert str(ROOT / "kernels") in checks["prefops"]["detail"]
    for name in ("triton kernel", "fused.matmul_fp32", "linear_logprobs aligned", "linear_logprobs odd",
                 "DPO lean", "DPO budget"):
        assert checks[name]["ok"], checks[name]
    rows = {(r["shape"], r["row"]): r for r in records if r.get("kind") == "row"}
    for shape, key in [(s, k) for k, where in first_light.CORE_ROWS.items() for s in where]:
        row = rows[(shape, key)]
        assert row["ms"] is not None and row["beyond"] is not None, row
        assert all(float(error) < 2e-2 for error in row["errors"]), row
    trl_row = rows[("A", "trl")]
    if importlib.util.find_spec("trl") is None:
        assert trl_row["reason"].startswith("skipped"), trl_row
    else:
        # Its tiles hold bf16 logits, as the naive row's do: about 5e-3 here, and O(1) if the adapter is wrong.
        assert trl_row["ms"] is not None and all(float(error) < 2e-2 for error in trl_row["errors"]), trl_row

    summary = (out / "summary.md").read_text()
    assert "CPU DRY RUN" in summary and "Bars passed:" in summary
    assert summary.count("| lean <= 1.45x floor, <= 0.25 GB |") == 3
    assert summary in done.stdout, "the summary comes last on stdout: the device tool returns the output's tail"
    print(f"dry run: {seconds:.0f} s")


def test_a_step_starts_only_with_its_time_left(tmp_path):
    assert first_light.main(["peers", "--out", str(tmp_path), "--device", "cpu", "--tiny",
                             "--deadline", str(time.time() + 5)]) == 0
    first_light.main(["summary", "--out", str(tmp_path), "--tiny"])
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["reason"][:22] for r in records if r["kind"] == "shape"] == ["skipped: out of time ("]
    assert not [r for r in records if r["kind"] in ("floor", "forward") or r.get("ms")]
    assert "| lean <= 1.45x floor, <= 0.25 GB | A | not run | — |" in (tmp_path / "summary.md").read_text()


def fwdbwd(shape, row, ratio, gib, notes=()):
    return {"phase": "core", "kind": "row", "shape": shape, "row": row, "label": row, "ms": 10.0 * ratio,
            "floor_ms": 10.0, "beyond": None if gib is None else int(gib * GIB), "errors": ["1e-6"] * 3,
            "reason": None, "notes": list(notes), "note": ""}


@pytest.mark.parametrize("record, verdict", [
    (fwdbwd("A", "lean", 1.44, 0.24), "pass"),
    (fwdbwd("A", "lean", 1.46, 0.24), "FAIL"),
    (fwdbwd("A", "lean", 1.44, 0.26), "FAIL"),
    (fwdbwd("A", "lean", 1.44, None), "FAIL"),  # no memory figure is no pass
    (fwdbwd("A", "budget", 1.10, 0.9, ["warning: a loss group does not fit the memory budget"]), "FAIL"),
])
def test_bar_verdicts(record, verdict):
    ratio_bar, gib_bar = {key: (ratio, gib) for key, _, ratio, gib in first_light.BARS}[record["row"]]
    assert first_light.bar_verdict(record, ratio_bar, gib_bar)[0] == verdict


def test_summary_reads_the_forward_bar_from_its_own_baseline(tmp_path):
    records = [fwdbwd("A", "lean", 1.40, 0.2),
               {"phase": "core", "kind": "forward", "shape": "A", "op": first_light.CORE_FORWARD[1], "ms": 10.5,
                "base_ms": 10.0, "reason": None},
               # The peers phase times its own baseline; it must not stand in for the core phase's.
               {"phase": "peers", "kind": "forward", "shape": "A", "op": first_light.FORWARD_BASE, "ms": 5.0,
                "base_ms": 5.0, "reason": None}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    first_light.main(["summary", "--out", str(tmp_path)])
    summary = (tmp_path / "summary.md").read_text()
    assert "| forward-only <= 1.1x one GEMM | A | 1.05x (10.50 / 10.00 ms) | pass |" in summary
    assert "| lean <= 1.45x floor, <= 0.25 GB | A | 1.40x, 0.20 GB | pass |" in summary
    assert "Bars passed: 2 of 6." in summary


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
