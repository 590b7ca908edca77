"""prefops.training with ranked lists: listwise losses, Curry-DPO curriculum pairs, shared-prompt packing."""
import json

import pytest
import torch

from prefops.losses.listwise import LISTWISE_LOSSES
from prefops.training import config as C, data as D, loop as L, model as M, objectives as O, references, run as R
from prefops.training.synthetic import TASKS
from prefops.training.tokenizer import CharTokenizer

from conftest import assert_fp32_close, assert_records_close
from helpers import nudge
from test_training import (  # noqa: F401 - tiny_model_and_batch is a fixture
    NO_AUTOCAST, STEP_TOKENS, TINY, fused_vs_reference_terms, make_config, model_dataset_reference,
    tiny_model_and_batch, train_records)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def ranked_rows(count=8):
    """Lists of 2 to 4 completions of unequal lengths, with a tie in some, under unequal prompts."""
    rows = []
    for i in range(count):
        size = 2 + i % 3
        completions = [str((i + k) % 10) * (1 + (i + k) % 3) for k in range(size)]
        scores = [float((3 * k + i) % 4) for k in range(size)]
        if len(set(scores)) == 1:
            scores[0] += 1
        rows.append({"prompt": f"{i}+{i}=" + "1" * (i % 4), "completions": completions, "scores": scores})
    return rows


def test_synthetic_ranked_rows_are_scored_by_the_ground_truth():
    task = TASKS["addition"]
    rows = task.rows("ranked", 50, seed=0, list_size=5)
    for row in rows:
        a, b = (int(x) for x in row["prompt"].rstrip("=").split("+"))
        digits = [int(c) for c in row["completions"]]
        assert len(set(digits)) == 5 and a + b in digits
        assert row["scores"] == [-abs(d - (a + b)) for d in digits]
    # The true sum sits in every slot, so position says nothing.
    assert len({row["completions"].index(str(sum(map(int, row["prompt"][:-1].split("+"))))) for row in rows}) == 5
    with pytest.raises(ValueError, match="list_size must lie in"):
        task.rows("ranked", 1, seed=0, list_size=11)


def test_ranked_batches_are_slot_major_in_every_layout(tmp_path):
    path = write_jsonl(tmp_path / "ranked.jsonl", ranked_rows(3) + [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    records, _ = D.records_for(D.read_rows(path, kind="ranked", size=0, seed=0), "dpo", ranked=True)
    assert [len(r.completions) for r in records] == [2, 3, 4, 2] and records[-1].scores == [1, 0]
    tokenizer = CharTokenizer("0123456789+=pab")
    dataset = D.build_dataset(records, tokenizer, 16, [])
    batches = {name: D.collate(dataset, [2, 0, 1], **options) for name, options in (
        ("padded", {"packing": False}), ("packed", {"packing": True}), ("shared", {"packing": False, "shared_prompt": True}))}
    lists = batches["padded"].lists
    assert lists.tolist() == [[0, 3, 6, 8], [1, 4, -1, -1], [2, 5, 7, -1]]  # slot-major, -1 past a list's end
    for batch in batches.values():
        assert torch.equal(batch.lists, lists) and batch.scores[0].tolist() == records[2].scores
        assert batch.num_sequences == 9 and batch.num_targets == batches["padded"].num_targets
    shared = batches["shared"]
    assert torch.equal(shared.lists, shared.layout.groups)
    assert shared.num_tokens + shared.tokens_saved == batches["packed"].num_tokens and shared.tokens_saved > 0


@pytest.fixture
def ranked_setup(tmp_path):
    path = write_jsonl(tmp_path / "ranked.jsonl", ranked_rows())
    config = make_config(tmp_path, model_config={**TINY, "tie_word_embeddings": True}, data=path, eval_fraction=0.0)
    records, _ = D.records_for(D.read_rows(path, kind="ranked", size=0, seed=0), "dpo", ranked=True)
    return model_dataset_reference(config, records)


def _gradients(model, config, batch, reference_lm):
    reference = (references.frozen_model(reference_lm, "reference", NO_AUTOCAST) if C.needs_reference(config)
                 else references.no_reference)
    objective = (O.ListwiseObjective if C.is_listwise(config) else O.PreferenceObjective)(config, reference)
    model.zero_grad()
    record = L.run_batches(M.FusedLM(model), objective, [batch], NO_AUTOCAST, backward=True)
    return record, {name: p.grad.clone() for name, p in model.named_parameters()}


LISTWISE_CASES = {
    "plackett_luce": {"loss_params": {"top_k": 2}},
    "lipo_lambda": {},
    "pro": {"reference": "none", "loss_params": {"pro_sft_weight": 0.3}},
    "adpo": {"loss_params": {"target": "soft"}},
    "list_ce": {"loss_params": {"target_temperature": 0.5}},
    "dcg_pairwise": {"loss_params": {"pairwise_type": "ipo"}},
    "all_pairs": {"loss_params": {"pairwise_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}},
    "sppo_response": {},
    "gpo": {},
    "spo": {"reference": "none"},
}


# Every loss on padded lists; the other layouts on one list-level and one pair-based loss.
LAYOUT_CASES = [(name, "padded") for name in LISTWISE_CASES] + [
    (name, layout) for name in ("plackett_luce", "all_pairs") for layout in ("packed", "shared")]


@pytest.mark.parametrize("loss_type, layout", LAYOUT_CASES)
def test_listwise_fused_and_reference_give_same_loss_and_gradients(ranked_setup, loss_type, layout):
    """Every listwise loss, its loss_params and each batch layout reach both paths, and they agree."""
    config, model, dataset, reference = ranked_setup
    assert set(LISTWISE_CASES) == set(LISTWISE_LOSSES)
    batch = D.collate(dataset, list(range(8)), packing=layout == "packed", shared_prompt=layout == "shared")
    results = {}
    for impl in ("fused", "reference"):
        step_config = C.from_dict({**C.to_dict(config), "loss_type": loss_type, "loss_impl": impl,
                                   **LISTWISE_CASES[loss_type]})
        results[impl] = _gradients(model, step_config, batch, reference)
    (fused, fused_grads), (expected, grads) = results["fused"], results["reference"]
    assert set(fused) == set(expected) >= {"loss", "rewards/accuracies", "rewards/kendall_tau", "rewards/margins"}
    terms = fused_vs_reference_terms(model, batch)
    assert_records_close(fused, expected, terms)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        assert_fp32_close(fused_grads[name], grad, terms, name)
    if LISTWISE_CASES[loss_type].get("loss_params"):  # a loss_params key silently dropped would not change the loss
        plain = {**C.to_dict(config), "loss_type": loss_type, "reference": LISTWISE_CASES[loss_type].get("reference",
                                                                                                       "auto")}
        assert _gradients(model, C.from_dict(plain), batch, reference)[0]["loss"] != pytest.approx(fused["loss"])


def test_shared_prompt_gives_the_loss_and_gradients_of_the_padded_batch(tiny_model_and_batch):
    """DPO + NLL (RPO) on shared-prompt packed pairs equals the padded layout; prompts are run once."""
    from test_training import _first_step_gradients
    config, model, dataset, reference = tiny_model_and_batch
    config = C.from_dict({**C.to_dict(config), "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]})
    padded = D.collate(dataset, list(range(8)), packing=False)
    shared = D.collate(dataset, list(range(8)), packing=False, shared_prompt=True)
    expected, grads = _first_step_gradients(model, config, padded, reference)
    loss, shared_grads = _first_step_gradients(model, config, shared, reference)
    terms = fused_vs_reference_terms(model, padded)
    assert_fp32_close(loss, expected, terms, "loss")
    for name, grad in grads.items():
        assert_fp32_close(shared_grads[name], grad, terms, name)
    unshared_tokens = sum(len(e.prompt_ids) + len(c) for e in dataset.examples for c in e.completion_ids)
    assert shared.num_tokens == unshared_tokens - shared.tokens_saved
    assert shared.tokens_saved == sum(len(e.prompt_ids) for e in dataset.examples) > 0


@pytest.mark.parametrize("packing", [False, True])
def test_listwise_accumulating_4x1_equals_1x4(tmp_path, packing):
    """Normalised by the step's lists, and the NLL term by the step's ordered pairs: micro-batching is exact."""
    path = write_jsonl(tmp_path / "ranked.jsonl", ranked_rows())
    trainer = L.Trainer(make_config(tmp_path, data=path, eval_fraction=0.0, packing=packing, loss_type="all_pairs",
                                    loss_params={"pairwise_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7]}))
    trainer.prepare("dpo")
    nudge(trainer.model, seed=None)
    train_set, objective = trainer.stages["dpo"].train_set, trainer.stages["dpo"].objective
    indices = D.step_indices(len(train_set), 0, 4, 0, "dpo")
    assert len({len(train_set.examples[i].completion_ids) for i in indices}) > 1  # lists of several lengths
    results = []
    for size in (4, 1):
        batches = [D.collate(train_set, indices[i:i + size], packing=packing) for i in range(0, 4, size)]
        trainer.model.zero_grad()
        record = L.run_batches(trainer.lm, objective, batches, trainer.autocast, backward=True)
        results.append((record, {name: p.grad.clone() for name, p in trainer.model.named_parameters()}))
    (one_by_four, grads), (four_by_one, accumulated) = results
    assert set(four_by_one) == set(one_by_four) > {"loss", "rewards/accuracies", "rewards/kendall_tau", "logps/mean"}
    # Metrics too, each weighted by its own count (lists, pairs, responses).
    assert_records_close(four_by_one, one_by_four, STEP_TOKENS)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        assert_fp32_close(accumulated[name], grad, STEP_TOKENS, name)


def test_precomputed_reference_of_ragged_lists_matches_the_frozen_model(tmp_path, ranked_setup):
    config, model, dataset, _ = ranked_setup
    batch = D.collate(dataset, [4, 1, 3], packing=False)
    frozen = references.frozen_model(model, "reference", NO_AUTOCAST)(batch)
    cached = references.precomputed(model, dataset, config, torch.device("cpu"), NO_AUTOCAST)(batch)
    assert len(frozen) == batch.lists.shape[1] and len(cached) == 4  # the dataset's longest list
    for a, b in zip(frozen, cached):
        torch.testing.assert_close(a, b)
    empty = torch.nn.functional.pad(batch.lists, (0, 1), value=-1) < 0
    assert empty.any() and torch.all(torch.stack(cached, 1)[empty] == 0)


@pytest.mark.parametrize("stages", ["rank", 2])
def test_curriculum_pairs_reach_the_batches_easy_to_hard(tmp_path, stages):
    config = make_config(tmp_path, synthetic_size=60, list_size=4, curriculum=stages, micro_batch_size=4,
                         eval_fraction=0.1, sft_steps=0, steps=3, shared_prompt=True, eval_every=3)
    trainer = L.Trainer(config)
    trainer.prepare("dpo")
    train_set = trainer.stages["dpo"].train_set
    assert len(train_set) == 54 * 3  # the best answer against each of the 3 others, for the 54 training lists
    tokenizer, task = trainer.tokenizer, trainer.task

    def gap(index):
        example = train_set.examples[index]
        prompt = tokenizer.decode(example.prompt_ids)
        chosen, rejected = (tokenizer.decode(ids) for ids in example.completion_ids)
        return task.score(prompt, chosen) - task.score(prompt, rejected)

    epoch = [i for step in range(len(train_set) // 6)  # 162 pairs: 27 steps of 6
             for i in D.step_indices(len(train_set), step, 6, config.seed, "dpo", train_set.curriculum)]
    assert sorted(epoch) == list(range(len(train_set)))
    stage_order = [train_set.examples[i].stage for i in epoch]
    assert stage_order == sorted(stage_order) and len(set(stage_order)) == (3 if stages == "rank" else 2)
    if stages == 2:  # the first half of the epoch holds the easy (large-gap) pairs
        half = len(epoch) // 2
        assert min(gap(i) for i in epoch[:half]) >= max(gap(i) for i in epoch[half:])
    # Within a stage the order is shuffled, and the next epoch starts again from the easy pairs.
    assert epoch[:8] != sorted(epoch[:8])
    assert train_set.examples[D.step_indices(len(train_set), len(train_set) // 6, 6, 0, "dpo",
                                             train_set.curriculum)[0]].stage == 0
    trainer.train()
    records = [r for r in train_records(config.out_dir) if r["stage"] == "dpo"]
    assert all(r["tokens_saved"] > 0 and r["tokens"] + r["tokens_saved"] > r["tokens"] for r in records)


def test_listwise_training_on_the_synthetic_task_learns(tmp_path):
    config = make_config(tmp_path, model_config={}, loss_type="plackett_luce", synthetic_size=1000, sft_steps=30,
                         steps=80, micro_batch_size=16, eval_every=80, eval_batches=4, win_rate_samples=256,
                         log_every=10, checkpoint_every=1000)
    summary = R.train(config)
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["loss"] < before["loss"] - 1 and after["rewards/kendall_tau"] > 0.5
    assert summary["win_rate_before"] < 0.25
    # 256 samples: the standard error at chance is 0.02, so +0.1 is five of them (100 steps reach 0.34).
    assert summary["win_rate_after"] > summary["win_rate_before"] + 0.1


@pytest.mark.parametrize("overrides, message", [
    ({"shared_prompt": True, "attn_implementation": "flash_attention_2"}, "shared_prompt needs an attention mask"),
    ({"shared_prompt": True, "ld_alpha": 0.5}, "ld_alpha needs padded batches.*shared_prompt: false"),
    ({"shared_prompt": True, "loss_type": "kto"}, "shared_prompt packs a prompt's pair or list"),
    ({"loss_type": ["plackett_luce", "sigmoid"]}, "a listwise loss_type .* cannot be combined"),
    ({"loss_type": "all_pairs", "label_smoothing": 0.1}, "label_smoothing applies to pairwise losses only.*loss_params"),
    ({"loss_type": "plackett_luce", "reference": "none"}, "'plackett_luce' needs a reference"),
    ({"loss_type": "plackett_luce", "curriculum": 2}, "curriculum turns ranked lists into pairs.*listwise"),
    ({"curriculum": 0}, "curriculum must be none, rank or a number of stages"),
    ({"curriculum": "easy"}, "curriculum must be none, rank or a number of stages"),
    ({"list_size": 1}, "list_size must be an integer >= 2"),
])
def test_ranked_and_shared_prompt_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        C.load(None, overrides)
    C.load(None, {"loss_type": "pro", "reference": "none"})  # reference-free listwise losses need none
