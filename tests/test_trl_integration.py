"""PrefopsDPOTrainer against TRL's own DPOTrainer on one batch (skipped without the optional `trl` extra).

Both trainers are built on copies of one tiny Llama, a character tokenizer and a
small in-memory dataset, all made here; compute_loss runs on the same collated
batch and the loss, every parameter gradient and the logged metrics must agree.
TRL 1.x has no padding-free mode, so the padding-free run is held to TRL's padded loss.
"""
import copy

import pytest
import torch
import transformers

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from conftest import relative_error  # noqa: E402
from prefops.integrations.trl import PrefopsDPOTrainer  # noqa: E402

CHARS = "abcdefghij "
PAIRS = 4
TOLERANCE = 1e-5  # both sides fp32: TRL's chunked log-softmax and the fused op
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"]


def tokenizer():
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>"] + list(CHARS))}
    characters = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    characters.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=characters, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def llama(vocab_size, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=24, intermediate_size=40,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=12, max_position_embeddings=64, tie_word_embeddings=True,
                                      pad_token_id=0, bos_token_id=None, eos_token_id=1)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # logits of a few units, not ~0
    return model


def dataset(tag, seed=0, rows=PAIRS):
    g = torch.Generator().manual_seed(seed)

    def text(low, high):
        n = int(torch.randint(low, high, (1,), generator=g))
        return "".join(CHARS[int(i)] for i in torch.randint(0, len(CHARS), (n,), generator=g))

    data = {"prompt": [text(2, 6) for _ in range(rows)], "chosen": [text(2, 9) for _ in range(rows)],
            "rejected": [text(2, 9) for _ in range(rows)], "source": [tag] * rows}  # tag: no shared ref cache
    return Dataset.from_dict(data)


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=PAIRS, report_to="none", use_cpu=True,
                    bf16=False, beta=0.2, gradient_checkpointing=False, max_length=None, save_strategy="no",
                    precompute_ref_log_probs=False)
    settings.update(overrides)
    return DPOConfig(**settings)


def run(trainer_class, model, tmp_path, ref_model=None, peft_config=None, **overrides):
    trainer = trainer_class(model=model, ref_model=ref_model, args=config(tmp_path / trainer_class.__name__,
                                                                          **overrides),
                            train_dataset=dataset(trainer_class.__name__), processing_class=tokenizer(),
                            peft_config=peft_config)
    examples = [trainer.train_dataset[i] for i in range(PAIRS)]
    batch = trainer._prepare_inputs(trainer.data_collator(examples))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    grads = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics, batch, trainer


def assert_same(ours, theirs):
    (loss, grads, metrics, *_), (trl_loss, trl_grads, trl_metrics, *_) = ours, theirs
    assert torch.isfinite(loss)
    assert relative_error(loss, trl_loss) <= TOLERANCE, (float(loss), float(trl_loss))
    assert relative_error(grads, trl_grads) <= TOLERANCE
    for key in METRICS + ["num_tokens"]:
        assert abs(metrics[key] - trl_metrics[key]) <= TOLERANCE * max(1.0, abs(trl_metrics[key])), key


def both(tmp_path, seed=0, with_ref_model=True, **overrides):
    vocab = len(tokenizer())
    model, ref = llama(vocab, seed), llama(vocab, seed + 1)
    refs = (copy.deepcopy(ref), copy.deepcopy(ref)) if with_ref_model else (None, None)
    theirs = run(DPOTrainer, copy.deepcopy(model), tmp_path, refs[0], **overrides)
    ours = run(PrefopsDPOTrainer, copy.deepcopy(model), tmp_path, refs[1], **overrides)
    return ours, theirs


@pytest.mark.parametrize("loss_type,weights,smoothing", [
    (["sigmoid"], None, 0.0),
    (["ipo"], None, 0.0),
    (["robust"], None, 0.1),
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.0),  # TRL's MPO recipe
])
def test_loss_types_match_trl_with_a_reference_model(tmp_path, loss_type, weights, smoothing):
    assert_same(*both(tmp_path, loss_type=loss_type, loss_weights=weights, label_smoothing=smoothing))


def test_gradient_checkpointing_matches_trl(tmp_path):  # TRL's default; the hidden states are caught all the same
    assert_same(*both(tmp_path, seed=2, gradient_checkpointing=True))


def test_precomputed_reference_logps_match_trl(tmp_path):
    ours, theirs = both(tmp_path, with_ref_model=False, precompute_ref_log_probs=True,
                        loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3])
    for key in ("ref_chosen_logps", "ref_rejected_logps"):  # each trainer precomputed its own column
        assert relative_error(ours[3][key], theirs[3][key]) <= TOLERANCE
    assert_same(ours, theirs)


@pytest.mark.parametrize("options", [dict(ld_alpha=0.5), dict(use_weighting=True), dict(ld_alpha=0.5, use_weighting=True)])
def test_ld_dpo_and_wpo_match_trl(tmp_path, options):
    assert_same(*both(tmp_path, seed=3, **options))


def test_padding_free_matches_trl_padded(tmp_path):
    vocab = len(tokenizer())
    model, ref = llama(vocab, 4), llama(vocab, 5)
    theirs = run(DPOTrainer, copy.deepcopy(model), tmp_path, copy.deepcopy(ref), loss_type=["sigmoid", "sft"],
                 loss_weights=[1.0, 0.5])
    ours = run(PrefopsDPOTrainer, copy.deepcopy(model), tmp_path, copy.deepcopy(ref), padding_free=True,
               loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    batch, trainer = ours[3], ours[4]
    assert trainer.padding_free and batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert int(batch["input_ids"].numel()) == int(theirs[3]["attention_mask"].sum())
    assert_same(ours, theirs)


def test_padding_free_with_precomputed_reference(tmp_path):
    vocab = len(tokenizer())
    model = llama(vocab, 6)
    theirs = run(DPOTrainer, copy.deepcopy(model), tmp_path, precompute_ref_log_probs=True)
    ours = run(PrefopsDPOTrainer, copy.deepcopy(model), tmp_path, precompute_ref_log_probs=True, padding_free=True)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        assert relative_error(ours[3][key], theirs[3][key]) <= TOLERANCE
    assert_same(ours, theirs)


def test_lora_policy_matches_trl(tmp_path):
    peft = pytest.importorskip("peft")
    vocab = len(tokenizer())
    lora = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = llama(vocab, 7)
    theirs = run(DPOTrainer, copy.deepcopy(model), tmp_path, peft_config=peft.LoraConfig(**lora))
    ours = run(PrefopsDPOTrainer, copy.deepcopy(model), tmp_path, peft_config=peft.LoraConfig(**lora))
    assert ours[1].numel() == theirs[1].numel() and float(ours[1].norm()) > 0
    assert_same(ours, theirs)


def test_training_steps_run(tmp_path):
    vocab = len(tokenizer())
    trainer = PrefopsDPOTrainer(model=llama(vocab), args=config(tmp_path, max_steps=2, padding_free=True,
                                                                precompute_ref_log_probs=True, logging_steps=1),
                                train_dataset=dataset("train", rows=2 * PAIRS), processing_class=tokenizer())
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]
    assert len(logged) == 2 and all(abs(entry["loss"]) < 100 for entry in logged)
    assert not torch.equal(before, trainer.model.lm_head.weight.detach())

