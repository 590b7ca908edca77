"""DNO (training/candidates.py, training/configs/dno.yaml): teacher and gold completions judged beside each
prompt's samples, end to end on CPU with a tiny policy and a tiny teacher built from configs."""
import json
import math

import pytest
import torch
import transformers

from prefops.training import config as C
from prefops.training.candidates import CandidateError
from prefops.training.online import OnlineTrainer
from prefops.training.synthetic import TASKS
from prefops.training.tokenizer import CharTokenizer

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2}
SMALL = {"model_config": TINY, "synthetic_size": 64, "sft_steps": 3, "micro_batch_size": 8, "win_rate_samples": 8,
         "eval_batches": 1, "log_every": 1, "checkpoint_every": 100, "plot": False, "tensorboard": False}
ONLINE = {"rounds": 2, "prompts_per_round": 6, "steps_per_round": 2, "eval_prompts": 4, "sample_batch_size": 6}


def dno_config(tmp_path, **online):
    return C.load(C.default_path().with_name("dno.yaml"),
                  {**SMALL, "out_dir": str(tmp_path / "run"), "online": {**ONLINE, **online}})


def save_teacher(path, seed=3):
    """A tiny causal LM with the sort task's character vocabulary, saved as a local directory."""
    torch.manual_seed(seed)
    vocab = len(CharTokenizer(TASKS["sort"].alphabet))
    transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab, **TINY)).save_pretrained(path)
    return str(path)


def capture_rounds(trainer):
    rounds, new_round = [], trainer.new_round
    trainer.new_round = lambda index, ref: rounds.append(new_round(index, ref)) or rounds[-1]
    return rounds


def test_dno_recipe_trains_with_gold_and_teacher_candidates(tmp_path):
    """The bundled recipe end to end: every prompt is judged with its K samples, the gold answer and the
    teacher's samples (K + 1 + 2 candidates: C(7, 2) comparisons each), and pairs hold the gold answer."""
    config = dno_config(tmp_path, teacher=save_teacher(tmp_path / "teacher"), teacher_samples=2)
    assert config.reference_update == "round" and C.online_options(config)["pairs"] == "margin"
    trainer = OnlineTrainer(config)
    rounds = capture_rounds(trainer)
    trainer.train()
    task = TASKS["sort"]
    assert len(rounds) == 2
    for current in rounds:
        assert current.stats["completions"] == 6 * 7 and current.stats["pairs"] >= 1
        gold_pairs = [r for r in current.records if task.answer(r.prompt) in r.completions]
        # The gold answer is the task's best: whenever it is paired it wins, and it trains with EOS.
        assert gold_pairs and all(r.completions[0] == task.answer(r.prompt) for r in gold_pairs)
        for record in gold_pairs:
            assert record.completion_ids[0][-1] == trainer.tokenizer.eos_token_id
    evals = [json.loads(line) for line in open(f"{config.out_dir}/log.jsonl")]
    judged = [r["judge_calls"] for r in evals if r["kind"] == "eval" and "round" in r]
    assert judged == [6 * 21, 2 * 6 * 21]
    assert all(math.isfinite(r["loss"]) for r in evals if r["kind"] == "train")


def test_teacher_completions_are_its_own_samples(tmp_path):
    """A teacher's candidates come from the teacher (seeded), not from the policy: the same prompts give
    the same teacher completions whatever the policy is."""
    config = dno_config(tmp_path, teacher=save_teacher(tmp_path / "teacher"), gold=None, teacher_samples=1,
                        rounds=1)
    trainer = OnlineTrainer(config)
    prompts = trainer.prompts(4, "round0")
    first = trainer.sample_and_judge(prompts, 2, "round0", candidates=trainer.candidates)
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    second = trainer.sample_and_judge(prompts, 2, "round0", candidates=trainer.candidates)
    teacher = lambda judged: [judged["completion_ids"][p][2] for p in range(4)]  # noqa: E731
    assert teacher(first) == teacher(second)
    assert [ids[:2] for ids in first["completion_ids"]] != [ids[:2] for ids in second["completion_ids"]]


def test_gold_from_a_file(tmp_path):
    config0 = dno_config(tmp_path, rounds=1)
    prompts = OnlineTrainer(config0).prompts(6, "round0")
    path = tmp_path / "gold.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": "0000"}) + "\n" for p in prompts))
    trainer = OnlineTrainer(dno_config(tmp_path, rounds=1, gold=str(path)))
    judged = trainer.sample_and_judge(prompts, 2, "round0", candidates=trainer.candidates)
    assert all(group[2] == "0000" for group in judged["completions"])
    assert judged["scores"].shape == (6, 3)
    with pytest.raises(CandidateError, match="no completion for the prompt"):
        trainer.sample_and_judge(["9999="], 2, "round0", candidates=trainer.candidates)


@pytest.mark.parametrize("online, error, message", [
    ({"teacher_samples": 0}, C.ConfigError, "online.teacher_samples must be a positive integer"),
    ({"gold": 3}, C.ConfigError, "online.gold must be task, a .jsonl path or null"),
])
def test_dno_config_errors(tmp_path, online, error, message):
    with pytest.raises(error, match=message):
        dno_config(tmp_path, **online)


def test_teacher_must_share_the_vocabulary(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=40, **TINY)).save_pretrained(tmp_path / "t")
    with pytest.raises(CandidateError, match="vocabulary of 40 tokens"):
        OnlineTrainer(dno_config(tmp_path, teacher=str(tmp_path / "t")))
