"""Smoke test of benchmarks/bench_training.py on CPU (tiny Llama): the longest-pair search over loss rows,
attention backends and layouts, its memory breakdown, and its time budget."""
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench_training  # noqa: E402


def table(path: Path) -> dict:
    """(loss, attention, layout) -> the rest of the row, from the report's longest-pair table."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in path.read_text().splitlines() if line.startswith("| ")]
    header = rows[0]
    assert header[-5:] == bench_training.MEMORY_COLUMNS
    return {tuple(cells[:3]): dict(zip(header[3:], cells[3:])) for cells in rows[1:]}


def test_longest_rows_and_breakdown(tmp_path):
    out = tmp_path / "train.md"
    bench_training.main(["--device", "cpu", "--tiny", "--part", "longest", "--rows", "prefops,trl",
                         "--attention", "sdpa,prefops,flash", "--layout", "packed", "--stop", "128", "--out", str(out)])
    rows = table(out)
    assert rows[("prefops", "flash", "packed")]["longest that trains"].startswith("skipped: flash_attn")
    measured = {key: row for key, row in rows.items() if key[1] != "flash"}
    assert len(measured) == 4
    for key, row in measured.items():
        assert row["longest that trains"] == "128 (the --stop cap)", key
        memory = {name: float(row[name]) for name in bench_training.MEMORY_COLUMNS}
        assert all(value > 0 for value in memory.values()), (key, memory)
        assert memory["step peak"] >= max(memory["activations"], memory["loss"]), (key, memory)
    # SDPA keeps packed sequences apart with transformers' [T, T] mask; prefops' attention never builds one.
    for loss in ("prefops", "trl"):
        sdpa, blocks = (float(rows[(loss, attention, "packed")]["attention"]) for attention in ("sdpa", "prefops"))
        assert sdpa > 2 * blocks, (loss, sdpa, blocks)


def test_time_budget_stops_after_the_first_try(tmp_path, capsys):
    out = tmp_path / "train.md"
    bench_training.main(["--device", "cpu", "--tiny", "--part", "longest", "--rows", "naive", "--budget", "0",
                         "--out", str(out)])
    assert capsys.readouterr().out.count(" tokens: ok") == 1
    row = table(out)[("naive", "sdpa", "padded")]
    assert row["longest that trains"] == "64 (time budget)" and row["shortest that runs out of memory"] == "-"
    assert float(row["step peak"]) > 0
