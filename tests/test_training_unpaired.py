"""prefops.training with unpaired losses (KTO, APO-zero unpaired, BCO): data, fused vs reference, learning."""
import json

import pytest

from prefops.training import config as C, data as D, loop as L, model as M, objectives as O, references, run as R
from prefops.training.tokenizer import CharTokenizer

from conftest import assert_fp32_close, assert_records_close
from test_training import NO_AUTOCAST, TINY, fused_vs_reference_terms, make_config, model_dataset_reference


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_pairs_and_labelled_rows_become_labelled_examples_with_kl_partners(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "2+2=", "completion": "4", "label": True},
        {"prompt": "3+3=", "completion": "7", "label": False},
        {"prompt": "4+4=", "completions": ["8", "9", "1"], "scores": [3, 2, 1]},
    ])
    rows = D.read_rows(path, kind="preference", size=0, seed=0)
    records, _ = D.records_for(rows, "dpo", unpaired=True)
    assert [(r.completions, r.label) for r in records] == [
        (["2"], True), (["3"], False), (["4"], True), (["7"], False), (["8"], True), (["1"], False)]
    sft_records, skipped = D.records_for(rows, "sft")
    assert [r.completions for r in sft_records] == [["2"], ["4"], ["8"]] and len(skipped) == 1
    assert "undesirable" in skipped[0]

    tokenizer = CharTokenizer("0123456789+=")
    dataset = D.build_dataset(records, tokenizer, 7, [], seed=0)
    own = [example.completion_ids[0] for example in dataset.examples]
    partners = [example.completion_ids[1] for example in dataset.examples]
    # Each example's partner is another example's completion (one cycle through a shuffle).
    assert sorted(map(tuple, partners)) == sorted(map(tuple, own)) and partners != own
    assert all(len(e.prompt_ids) + len(e.completion_ids[1]) <= 7 for e in dataset.examples)
    batch = D.collate(dataset, [0, 3, 5], packing=True)
    assert batch.labels.tolist() == [True, False, False] and batch.num_sequences == 6
    for packing in (False, True):
        batch = D.collate(dataset, [0, 3, 5], packing=packing)
        kl_part = batch.completion(1)
        assert kl_part.num_sequences == 3 and kl_part.num_targets == sum(len(partners[i]) for i in (0, 3, 5))


def test_labelled_rows_need_an_unpaired_loss_and_prompt_completion_rows_a_label(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "a"}])
    with pytest.raises(D.DataError, match=r"sft.jsonl:1: unpaired losses need a 'label'"):
        D.records_for(D.read_rows(path, kind="preference", size=0, seed=0), "dpo", unpaired=True)


@pytest.mark.parametrize("overrides, message", [
    ({"loss_type": ["kto", "sigmoid"]}, "cannot be combined"),
    ({"loss_type": "kto", "wpo": True}, "wpo applies to pairwise losses only"),
    ({"loss_type": "kto", "reference": "none"}, "needs a reference"),
    ({"loss_type": "dpo"}, "loss_type .*dpo.* is unknown; valid: pairwise .*sigmoid.*unpaired kto"),
    ({"ld_alpha": 0.5, "packing": True}, "ld_alpha needs padded batches"),
    ({"strategy": "fast"}, "strategy must be one of None, auto, budget, sliced, lean"),
    ({"loss_type": "aot", "grad_accum_steps": 2}, "'aot' couples the pairs of a batch.*grad_accum_steps: 1"),
    ({"loss_type": ["sigmoid", "tdpo1"], "reference": "precomputed"}, "'tdpo1' needs the reference model's whole"),
])
def test_objective_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        C.load(None, overrides)


@pytest.fixture
def kto_setup(tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": f"{i}+{i}=", "completion": str(i) * (1 + i % 3), "label": i % 3 != 1} for i in range(8)])
    config = make_config(tmp_path, model_config={**TINY, "tie_word_embeddings": True}, data=path, eval_fraction=0.0)
    records, _ = D.records_for(D.read_rows(path, kind="preference", size=0, seed=0), "dpo", unpaired=True)
    return model_dataset_reference(config, records, scale=0.1)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired", "bco"])
@pytest.mark.parametrize("packing", [False, True])
def test_unpaired_fused_and_reference_give_same_gradients(kto_setup, loss_type, packing):
    config, model, dataset, reference_lm = kto_setup
    batch = D.collate(dataset, list(range(8)), packing=packing)
    results = {}
    for impl in ("fused", "reference"):
        step_config = C.from_dict({**C.to_dict(config), "loss_type": loss_type, "loss_impl": impl})
        objective = O.UnpairedObjective(step_config, references.frozen_model(reference_lm, "reference", NO_AUTOCAST))
        model.zero_grad()
        record = L.run_batches(M.FusedLM(model), objective, [batch], NO_AUTOCAST, backward=True)
        results[impl] = record, {name: p.grad.clone() for name, p in model.named_parameters()}
    fused, reference = results["fused"], results["reference"]
    assert set(fused[0]) == set(reference[0]) >= {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins"}
    terms = fused_vs_reference_terms(model, batch)
    assert_records_close(fused[0], reference[0], terms)
    if loss_type == "kto":
        assert reference[0]["kl"] > 0  # the perturbed policy moved off the reference: z_0 is in play
    for name, grad in reference[1].items():
        assert grad.abs().max() > 0, name
        assert_fp32_close(fused[1][name], grad, terms, name)


def test_kto_training_on_the_synthetic_task_learns(tmp_path):
    config = make_config(tmp_path, model_config={}, loss_type="kto", synthetic_size=1000, sft_steps=30, steps=120,
                         micro_batch_size=32, eval_every=120, eval_batches=4, win_rate_samples=256, log_every=10,
                         checkpoint_every=1000)
    summary = R.train(config)
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["loss"] < before["loss"] - 0.08
    assert after["rewards/margins"] > 1.0 and after["rewards/chosen"] > after["rewards/rejected"]
    assert summary["win_rate_after"] > summary["win_rate_before"] + 0.04
