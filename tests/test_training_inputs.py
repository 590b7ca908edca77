"""prefops.training input handling: data formats, tokenisation masks, and every bad-input report."""
import json

import pytest

from prefops.tools import cli
from prefops.training import config as C, data as D
from prefops.training.tokenizer import CharTokenizer


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def test_targets_mask_prompt_and_padding_with_next_token_shift():
    tokenizer = CharTokenizer()
    record = D.Record("x", "ab", ["cd", "e"])
    dataset = D.build_dataset([record], tokenizer, 16, [])
    batch = D.collate(dataset, [0], packing=False)
    ids = [tokenizer.bos_token_id] + tokenizer.encode("ab", add_special_tokens=False)
    c, d, e = (tokenizer.encode(x, add_special_tokens=False)[0] for x in "cde")
    eos = tokenizer.eos_token_id
    assert batch.input_ids[0].tolist() == ids + [c, d, eos]
    assert batch.targets.tolist() == [[-100, -100, c, d, eos, -100], [-100, -100, e, eos, -100, -100]]
    assert batch.attention_mask[1].tolist() == [1, 1, 1, 1, 1, 0]
    packed = D.collate(dataset, [0], packing=True)
    assert packed.cu_seqlens.tolist() == [0, 6, 11]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]]


def test_conversational_rows_use_the_chat_template(tmp_path):
    tokenizer = CharTokenizer()
    messages = [{"role": "user", "content": "hi"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"chosen": messages + [{"role": "assistant", "content": "hello"}],
         "rejected": messages + [{"role": "assistant", "content": "go"}]},  # implicit prompt
        {"prompt": messages, "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]},
    ])
    records, _ = D.records_for(D.read_rows(path, kind="preference", size=0, seed=0), "dpo")
    example = D.build_dataset(records, tokenizer, 64, []).examples[0]
    assert tokenizer.decode(example.prompt_ids) == "user: hi\nassistant: "
    assert tokenizer.decode(example.completion_ids[0]) == "hello\n"
    assert example.completion_ids[0][-1] == tokenizer.eos_token_id


def test_ranked_rows_are_validated_and_binarised(tmp_path):
    path = write_jsonl(tmp_path / "ranked.jsonl", [
        {"prompt": "p", "completions": ["a", "b", "c"], "scores": [0.5, 2, -1]},
        {"prompt": "p", "completions": ["a", "b"], "scores": [1, 1]},
    ])
    records, skipped = D.records_for(D.read_rows(path, kind="preference", size=0, seed=0), "dpo")
    assert records[0].completions == ["b", "c"]
    assert skipped == [f"{path}:2 (all scores tie)"]


@pytest.mark.parametrize("row, field", [
    ({"prompt": "p", "chosen": "a"}, "'rejected'"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "'chosen'"),
    ({"prompt": "p", "completions": ["a", "b"], "scores": [1]}, "'scores'"),
    ({"prompt": "p", "completion": "a", "label": "yes"}, "'label'"),
    ({"prompt": [{"role": "user"}], "chosen": [], "rejected": []}, "'chosen'"),
])
def test_malformed_row_is_reported_with_file_line_and_field(tmp_path, row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(D.DataError) as error:
        D.records_for(D.read_rows(path, kind="preference", size=0, seed=0), "dpo")
    assert f"{path}:2" in str(error.value) and field in str(error.value)


def test_invalid_json_and_unpaired_rows_are_reported(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, "{oops"])
    with pytest.raises(D.DataError, match=r"broken.jsonl:2: invalid JSON"):
        D.read_rows(path, kind="preference", size=0, seed=0)
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "a", "label": True}])
    with pytest.raises(D.DataError, match=r"kto.jsonl:1: unpaired \(KTO\) rows need an unpaired loss"):
        D.records_for(D.read_rows(path, kind="preference", size=0, seed=0), "dpo")


def test_truncation_that_removes_every_completion_token_is_reported_and_skipped():
    tokenizer = CharTokenizer()
    records = [D.Record("f.jsonl:1", "short", ["ok", "no"]), D.Record("f.jsonl:2", "x" * 20, ["ok", "no"])]
    dataset = D.build_dataset(records, tokenizer, 8, [])
    assert len(dataset) == 1 and dataset.skipped == ["f.jsonl:2 (completion truncated away by max_length=8)"]
    kept = dataset.examples[0]
    assert len(kept.prompt_ids) + max(map(len, kept.completion_ids)) <= 8
    with pytest.raises(D.DataError, match="no example left"):
        D.build_dataset(records[1:], tokenizer, 8, [])


def test_unknown_config_key_lists_valid_keys(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown config key.*lerning_rate.*valid keys: model, "):
        C.load(None, {"lerning_rate": 1})
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 3\nbeta_: 0.1\n")
    assert cli.main(["train", str(path)]) == 2
    assert "unknown config key(s) beta_" in capsys.readouterr().err


def test_cli_overrides_are_typed():
    overrides = C.parse_overrides(["--steps", "10", "--lr=3e-3", "--packing", "true", "--model_config.hidden_size", "8"])
    assert overrides == {"steps": 10, "lr": "3e-3", "packing": True, "model_config": {"hidden_size": 8}}
    config = C.load(None, overrides)
    assert config.lr == 3e-3 and config.model_config["hidden_size"] == 8 and config.model_config["num_hidden_layers"]


def test_cli_train_then_eval(tmp_path, capsys):
    common = ["--out_dir", str(tmp_path / "run"), "--model_config.hidden_size", "32", "--model_config.num_hidden_layers",
              "1", "--synthetic_size", "100", "--sft_steps", "1", "--steps", "2", "--micro_batch_size", "4",
              "--win_rate_samples", "8", "--eval_batches", "1", "--plot", "false"]
    assert cli.main(["train", *common]) == 0
    assert cli.main(["eval", *common]) == 0
    assert "[dpo eval 2]" in capsys.readouterr().out


def test_hf_datasets_source(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "hfdata"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3)
    rows = D.read_rows(f"hf:{folder}", kind="preference", size=0, seed=0)
    assert len(rows) == 3 and rows[0][0] == f"hf:{folder}#0"
    assert D.records_for(rows, "dpo")[0][0].completions == ["a", "b"]
