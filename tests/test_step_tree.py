"""MCTS-DPO step-level pairs (training/step_tree.py): the tree's values and sibling pairs from a hand-built
tree, a grown tree's shape, and an online run training on step pairs with the shared prefix packed once."""
import json
import math

import pytest
import torch
import transformers

from prefops.training import config as C, step_tree
from prefops.training.online import OnlineTrainer
from prefops.training.step_tree import Node
from prefops.training.tokenizer import CharTokenizer
from test_online import make_config


def test_siblings_are_paired_best_against_worst_by_mean_leaf_score():
    a1, a2, a3 = Node("1", [1], done=True), Node("2", [2], done=True), Node("22", [2, 2], done=True)
    a, b, c = Node("A", [10], children=[a1, a2, a3]), Node("B", [11], done=True), Node("C", [12], done=True)
    same = Node("C", [12], done=True)
    root = Node("", [], children=[a, b, c, same])
    # leaf scores as the judge gives them; a NaN leaf (a failed judgement) is left out of the means
    for path, score in (([root, a, a1], 1.0), ([root, a, a2], 3.0), ([root, a, a3], math.nan), ([root, b], 0.5),
                        ([root, c], 5.0), ([root, same], 5.0)):
        for node in path:
            node.leaf_scores.append(score)
    assert a.value == 2.0 and root.value == pytest.approx((1 + 3 + 0.5 + 5 + 5) / 5)
    pairs = step_tree.sibling_pairs("x=", root, "w")
    # root: best C (5) against worst B (0.5); under A: A2 (3) against A1 (1); A3 has no value
    assert [(r.prompt, r.completions, r.completion_ids) for r in pairs] == [
        ("x=", ["C", "B"], [[12], [11]]), ("x=A", ["2", "1"], [[2], [1]])]


def test_cut_step_keeps_the_boundary():
    assert step_tree.cut_step([5, 6, 9, 7, 9], 9) == [5, 6, 9]
    assert step_tree.cut_step([5, 6, 7], 9) == [5, 6, 7]
    assert step_tree.cut_step([5, 6, 7], None) == [5, 6, 7]


def test_grown_tree_has_the_asked_shape():
    tokenizer = CharTokenizer("0123456789=\n")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    newline = tokenizer.encode("\n", add_special_tokens=False)[0]
    roots, leaves, _ = step_tree.grow(model, tokenizer, ["12=", "345="], depth=2, branching=3, boundary=newline,
                                      step_max_tokens=4, rollout_tokens=5, temperature=1.0, top_p=1.0, seed=0,
                                      device="cpu", batch_size=4)
    for root, prompt_leaves in zip(roots, leaves):
        def check(node, level):
            if level:
                assert 1 <= len(node.ids) <= 4 and (newline not in node.ids[:-1])
                assert node.text == tokenizer.decode(node.ids)
            expected = 0 if node.done or level == 2 else 3
            assert len(node.children) == expected
            for child in node.children:
                check(child, level + 1)
        check(root, 0)
        assert 1 <= len(prompt_leaves) <= 9
        for path, text in prompt_leaves:
            assert text.startswith("".join(node.text for node in path[1:]))


def test_online_trains_on_step_pairs_with_the_prefix_packed_once(tmp_path):
    config = make_config(tmp_path, shared_prompt=True, online={
        "tree_depth": 2, "tree_branching": 2, "step_boundary": None, "step_max_tokens": 2, "rounds": 2,
        "prompts_per_round": 4})
    trainer = OnlineTrainer(config)
    rounds, new_round = [], trainer.new_round
    trainer.new_round = lambda index, ref: rounds.append(new_round(index, ref)) or rounds[-1]
    trainer.train()
    for current in rounds:
        assert current.records and current.stats["completions"] <= 4 * 4
        for record in current.records:
            prompt, prefix = record.prompt.split("=", 1)
            # the prompt, then 0 or 1 steps of at most 2 tokens (a special token sampled decodes to nothing)
            assert len(prompt) == 4 and len(prefix) <= 2
            assert all(1 <= len(ids) <= 2 for ids in record.completion_ids)
    log = [json.loads(line) for line in open(f"{config.out_dir}/log.jsonl")]
    train = [r for r in log if r["kind"] == "train" and r["stage"] == "dpo"]
    assert all(math.isfinite(r["loss"]) for r in train) and all(r["tokens_saved"] > 0 for r in train)
    assert [r["judge_calls"] for r in log if r["kind"] == "eval" and "round" in r][-1] <= 2 * 4 * 4


@pytest.mark.parametrize("online, message", [
    ({"tree_depth": 2, "pairs": "all_pairs"}, "cannot take pairs"),
    ({"tree_depth": 2, "soft_labels": True}, "cannot take soft_labels"),
    ({"tree_depth": 1, "tree_branching": 1}, "online.tree_branching must be an integer >= 2"),
    ({"tree_depth": -1}, "online.tree_depth must be an integer >= 0"),
])
def test_step_tree_config_errors(tmp_path, online, message):
    with pytest.raises(C.ConfigError, match=message):
        make_config(tmp_path, online=online)


def test_a_step_boundary_must_be_one_token(tmp_path):
    trainer = OnlineTrainer(make_config(tmp_path, online={"tree_depth": 1, "step_boundary": "x"}))
    with pytest.raises(C.ConfigError, match="online.step_boundary 'x' must be one token"):
        trainer.step_tree_pairs(["1234="], 0)
