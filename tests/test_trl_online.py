"""PrefopsOnlineDPOTrainer against TRL's OnlineDPOTrainer on one training step (skipped without `trl`).

Both trainers get copies of one tiny Llama, a character tokenizer, the same prompts
and a reward function, all made here; one training_step each from the same RNG state
must sample the same completions, and give the same loss, every parameter gradient
and every logged metric (TRL's `stats`, averaged into the logs as they are).
"""
import copy

import pytest
import torch
import transformers

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer  # noqa: E402

from conftest import relative_error  # noqa: E402
from prefops.integrations.trl import PrefopsOnlineDPOTrainer  # noqa: E402
from test_trl_integration import CHARS, llama, tokenizer  # noqa: E402

PROMPTS = 4
TOLERANCE = 1e-5  # both sides fp32: TRL's log-softmax of the full logits and the fused op


def prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return ["".join(CHARS[int(i)] for i in torch.randint(0, len(CHARS), (int(n),), generator=g))
            for n in torch.randint(2, 7, (PROMPTS,), generator=g)]


def reward(sampled):
    def distinct_characters(prompts, completions, completion_ids, **kwargs):
        sampled.append(completion_ids)
        return [len(set(text)) + 0.1 * len(text) for text in completions]
    return distinct_characters


def reward_model(vocab_size):
    torch.manual_seed(7)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_labels=1,
                                      pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config)


def step(trainer_class, model, ref_model, tmp_path, peft_config=None, scorer=None, **overrides):
    settings = dict(output_dir=str(tmp_path / trainer_class.__name__), per_device_train_batch_size=PROMPTS,
                    report_to="none", use_cpu=True, bf16=False, beta=0.3, max_new_tokens=6, max_length=64,
                    temperature=1.3, missing_eos_penalty=0.5, save_strategy="no")
    settings.update(overrides)
    sampled = []
    rewards, processors = [reward(sampled)], [None]
    if scorer is not None:
        rewards, processors = rewards + [scorer], processors + [tokenizer()]
    trainer = trainer_class(model=model, ref_model=ref_model, reward_funcs=rewards, args=OnlineDPOConfig(**settings),
                            train_dataset=Dataset.from_dict({"prompt": prompts()}), processing_class=tokenizer(),
                            reward_processing_classes=processors, peft_config=peft_config)
    torch.manual_seed(1)
    loss = trainer.training_step(trainer.model, {"prompt": prompts()})
    grads = {name: p.grad for name, p in trainer.model.named_parameters() if p.requires_grad}
    return loss, grads, {key: value[-1] for key, value in trainer.stats.items()}, sampled


def assert_same(ours, theirs):
    (loss, grads, metrics, sampled), (trl_loss, trl_grads, trl_metrics, trl_sampled) = ours, theirs
    assert sampled == trl_sampled and len(sampled) == 1
    assert torch.isfinite(loss) and relative_error(loss, trl_loss) <= TOLERANCE, (float(loss), float(trl_loss))
    assert grads.keys() == trl_grads.keys()
    for name, grad in grads.items():
        assert relative_error(grad, trl_grads[name]) <= TOLERANCE, name
    assert metrics.keys() == trl_metrics.keys()
    for key, value in metrics.items():
        assert abs(value - trl_metrics[key]) <= TOLERANCE * max(1.0, abs(trl_metrics[key])), (key, value,
                                                                                            trl_metrics[key])


def both(tmp_path, seed=0, with_ref_model=True, scorer=None, **overrides):
    vocab = len(tokenizer())
    model, ref = llama(vocab, seed), llama(vocab, seed + 1)
    refs = (copy.deepcopy(ref), copy.deepcopy(ref)) if with_ref_model else (None, None)
    theirs = step(OnlineDPOTrainer, copy.deepcopy(model), refs[0], tmp_path, scorer=copy.deepcopy(scorer), **overrides)
    ours = step(PrefopsOnlineDPOTrainer, copy.deepcopy(model), refs[1], tmp_path, scorer=copy.deepcopy(scorer),
                **overrides)
    return ours, theirs


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_one_step_matches_trl_with_a_reference_model(tmp_path, loss_type):
    assert_same(*both(tmp_path, loss_type=loss_type))


@pytest.mark.parametrize("max_length", [8, 6])  # prompts cut on the left; at 6 (= max_new_tokens) cut away entirely
def test_truncated_prompts_match_trl(tmp_path, max_length):
    assert_same(*both(tmp_path, seed=2, max_length=max_length))


def test_default_reference_and_a_reward_model_match_trl(tmp_path):  # TRL copies the policy as its reference
    assert_same(*both(tmp_path, seed=3, with_ref_model=False, scorer=reward_model(len(tokenizer())),
                      reward_weights=[1.0, 2.0], loss_type="ipo"))


def test_peft_reference_matches_trl(tmp_path):  # no ref_model: the policy with its LoRA adapter disabled
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ours, theirs = both(tmp_path, seed=4, with_ref_model=False, peft_config=lora)
    assert ours[1] and all("lora_" in name for name in ours[1])
    assert_same(ours, theirs)


def test_forward_builds_no_logits(tmp_path):
    vocab = len(tokenizer())
    trainer = PrefopsOnlineDPOTrainer(model=llama(vocab), reward_funcs=reward([]), processing_class=tokenizer(),
                                      args=OnlineDPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                                           max_new_tokens=5, max_length=64),
                                      train_dataset=Dataset.from_dict({"prompt": prompts()}))
    g = torch.Generator().manual_seed(5)
    prompt_ids = torch.randint(3, vocab, (4, 3), generator=g)
    completion_ids = torch.randint(3, vocab, (4, 5), generator=g)
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]])
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    inputs = (prompt_ids, prompt_mask, completion_ids.masked_fill(completion_mask == 0, 0), completion_mask)
    rows = []
    handle = trainer.model.lm_head.register_forward_hook(lambda module, args, out: rows.append(out.shape[-2]))
    try:
        logps = trainer._forward(trainer.model, *inputs)
    finally:
        handle.remove()
    assert rows == [0]
    expected = OnlineDPOTrainer._forward(trainer, trainer.model, *inputs)
    assert logps.shape == expected.shape and relative_error(logps, expected) <= TOLERANCE
