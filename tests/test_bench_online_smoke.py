"""Smoke test of benchmarks/bench_online.py on CPU (tiny Llama): the round's phases, as on the GPU."""
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench_online  # noqa: E402


def test_rounds_time_every_phase(tmp_path):
    out = tmp_path / "online.md"
    prompts, samples, new_tokens = 6, 3, 10
    records = bench_online.main(["--device", "cpu", "--tiny", "--prompts", str(prompts), "--samples", str(samples),
                                 "--new-tokens", str(new_tokens), "--sample-batch", "5", "--micro-batch", "2",
                                 "--out", str(out)])
    assert len(records) == 2  # a warm-up round and a timed one
    for record in records:
        assert record["new_tokens"] == prompts * samples * new_tokens  # every completion full length
        assert record["judge_calls"] == prompts * samples and 1 <= record["pairs"] <= prompts
        assert record["steps"] == math.ceil(record["pairs"] / 2) and record["train_tokens"] > 0
        # The reference is the policy at the round's start: the first step's loss is -log sigmoid(0).
        assert record["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert all(record[f"{phase}_s"] > 0 and record[f"{phase}_peak"] > 0 for phase in bench_online.PHASES)
    text = out.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert set(bench_online.PHASES) | {"round"} <= set(rows)
    assert "generated" in rows["sample"] and "trained" in rows["train"]


def test_synthetic_tokenizer_round_trips_every_id():
    tokenizer = bench_online.SyntheticTokenizer(128256)
    ids = [2, 8190, 8191, 128255]  # U+FFFE and U+FFFF are noncharacters, still characters of a str
    assert tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False) == ids
    assert tokenizer.encode(tokenizer.decode([0, 1, *ids])) == [1, *ids]  # specials skipped; BOS added


def test_bad_option_names_itself(capsys):
    with pytest.raises(SystemExit):
        bench_online.parse_args(["--samples", "1"])
    assert "--samples must be >= 2" in capsys.readouterr().err
