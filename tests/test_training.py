"""prefops.training: the default job end to end (small), and the equivalences the loop promises.

Everything runs on a CPU in seconds: a 1-layer Llama of width 32 on the bundled
addition task.
"""
import copy
import json

import pytest
import torch

import prefops
from conftest import assert_fp32_close
from helpers import interrupted_then_resumed, nudge
from prefops.training import checkpoint, config as C, data as D, loop as L, model as M, objectives as O, references
from prefops.training import run as R

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def make_config(tmp_path, **overrides):
    values = dict(model_config=TINY, synthetic_size=200, sft_steps=2, steps=4, micro_batch_size=4, eval_every=2,
                  eval_batches=2, win_rate_samples=16, log_every=1, checkpoint_every=2, plot=False,
                  tensorboard=False, out_dir=str(tmp_path / "run"), ref_cache_dir=str(tmp_path / "cache"))
    values.update(overrides)
    return C.load(None, values)


def dataclass_replace(config, **changes):
    return C.from_dict({**C.to_dict(config), **changes})


def train_records(out_dir):
    lines = (json.loads(line) for line in open(f"{out_dir}/log.jsonl"))
    return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in lines if r["kind"] == "train"]


def test_default_job_small(tmp_path):
    """The shipped default job at a smaller size: loss falls, reward accuracy and win rate rise."""
    config = make_config(tmp_path, model_config={}, synthetic_size=1000, sft_steps=30, steps=120, micro_batch_size=32,
                         eval_every=60, eval_batches=4, win_rate_samples=128, log_every=10, checkpoint_every=1000,
                         plot=True)
    summary = R.train(config)
    records = [r for r in train_records(config.out_dir) if r["stage"] == "dpo"]
    assert sum(r["loss"] for r in records[-3:]) / 3 < 0.5 * records[0]["loss"]
    assert summary["eval_after"]["rewards/accuracies"] > 0.8
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert summary["win_rate_before"] < 0.25  # chance is 0.1
    assert summary["win_rate_after"] > summary["win_rate_before"] + 0.2
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert {"rewards/chosen", "rewards/margins", "tokens", "completion_tokens", "lr"} <= set(records[-1])


NO_AUTOCAST = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731


def fused_vs_reference_terms(model, batch):
    """The longest fp32 sums two paths of one step order differently (tests/conftest.py): a
    weight gradient's sum over the batch's tokens, each through a softmax over the vocabulary."""
    return batch.input_ids.numel() + model.config.vocab_size


def _first_step_gradients(model, config, batch, reference_lm=None):
    reference_lm = reference_lm or M.FusedLM(M.frozen_copy(model))
    reference = (references.frozen_distributions(reference_lm, NO_AUTOCAST) if C.is_token_level(config)
                 else references.frozen_model(reference_lm, "reference", NO_AUTOCAST, config.ld_alpha))
    objective = O.PreferenceObjective(config, reference)
    model.zero_grad()
    record = L.run_batches(M.FusedLM(model), objective, [batch], NO_AUTOCAST, backward=True)
    return torch.tensor(record["loss"]), {name: p.grad.clone() for name, p in model.named_parameters()}


def model_dataset_reference(config, records, *, scale=0.05, softcap=None):
    """A tiny model, the dataset of `records`, and a frozen copy as reference, which the model is then
    moved off (so that losses are not at their symmetric point)."""
    model, tokenizer = M.build(config, torch.device("cpu"), "0123456789+=")
    model.config.final_logit_softcapping = softcap
    dataset = D.build_dataset(records, tokenizer, 16, [])
    reference = M.FusedLM(M.frozen_copy(model))
    nudge(model, scale, seed=None)
    return config, model, dataset, reference


@pytest.fixture
def tiny_model_and_batch(tmp_path):
    config = make_config(tmp_path, model_config={**TINY, "tie_word_embeddings": True})
    # Completions of unequal lengths, so that length-aware options (LD-DPO, SimPO) matter.
    records = [D.Record(f"row{i}", f"{i}+{i}=", [str(2 * i) * (1 + i % 3), str(i) * (1 + (i + 1) % 4)])
               for i in range(8)]
    # softcap: exercised through Head.of, as Gemma-2 would set it
    return model_dataset_reference(config, records, softcap=3.0)


@pytest.mark.parametrize("objective", [
    {},
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},  # RPO
    {"loss_type": "ipo", "label_smoothing": 0.0},
    {"loss_type": "orpo", "reference": "none"},
    {"loss_type": "simpo", "loss_params": {"simpo_gamma": 0.3}, "label_smoothing": 0.1},
    {"wpo": True},
    {"ld_alpha": 0.5},
    {"ld_alpha": 0.5, "wpo": True},
    {"label_smoothing": 0.2, "strategy": "budget", "budget": "64KB"},
    {"loss_type": "tdpo1"},
    {"loss_type": ["tdpo2", "sft"], "kl_direction": "policy_ref", "loss_params": {"tdpo_alpha": 0.3}},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "sigmoid")
def test_fused_and_reference_give_same_first_step_gradients(tiny_model_and_batch, objective):
    """Every config field of the pairwise loss reaches both paths, and they agree."""
    config, model, dataset, reference = tiny_model_and_batch
    assert M.linear_logprobs_fn("fused") is prefops.linear_logprobs
    batch = D.collate(dataset, list(range(8)), packing=False)
    results = {}
    for impl in ("fused", "reference"):
        results[impl] = _first_step_gradients(model, dataclass_replace(config, loss_impl=impl, **objective), batch,
                                              reference)
    terms = fused_vs_reference_terms(model, batch)
    assert_fp32_close(results["fused"][0], results["reference"][0], terms, "loss")
    for name, grad in results["reference"][1].items():
        assert grad.abs().max() > 0, name
        assert_fp32_close(results["fused"][1][name], grad, terms, name)
    # The options change the loss: a field silently dropped would leave it at plain DPO's.
    if objective:
        plain = _first_step_gradients(model, config, batch, reference)[0]
        assert not torch.allclose(results["fused"][0], plain, rtol=1e-4)


def test_packed_and_padded_batches_give_same_loss_and_gradients(tiny_model_and_batch):
    config, model, dataset, _ = tiny_model_and_batch
    padded_batch = D.collate(dataset, list(range(8)), packing=False)
    padded = _first_step_gradients(model, config, padded_batch)
    packed_batch = D.collate(dataset, list(range(8)), packing=True)
    assert packed_batch.input_ids.shape[0] == 1 and packed_batch.num_tokens < padded_batch.input_ids.numel()
    packed = _first_step_gradients(model, config, packed_batch)
    terms = fused_vs_reference_terms(model, padded_batch)
    assert_fp32_close(packed[0], padded[0], terms, "loss")
    for name, grad in padded[1].items():
        assert_fp32_close(packed[1][name], grad, terms, name)
    # Without the block-diagonal mask the packed sequences would see each other.
    model.config._attn_implementation = "eager"
    assert_fp32_close(_first_step_gradients(model, config, packed_batch)[0], padded[0], terms, "loss (eager)")


def test_head_matches_hf_logits_with_softcap_and_logit_scaling():
    """Head.of reads softcap / logit scaling so that log-probs equal log_softmax of the HF model's logits."""
    import transformers
    small = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8)
    models = [transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**small, final_logit_softcapping=2.0)),
              transformers.GraniteForCausalLM(transformers.GraniteConfig(**small, logits_scaling=4.0))]
    targets = torch.randint(0, 40, (2, 6))
    batch = D.Batch(targets, targets, torch.ones_like(targets), None, None, torch.arange(1))
    for model in models:
        with torch.no_grad():
            expected = model(input_ids=targets).logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
            torch.testing.assert_close(M.token_logprobs(model, batch, "fused"), expected, rtol=1e-4, atol=1e-5)


def _step_gradients(trainer, stage, micro_batch_size):
    """Loss and gradients of optimizer step 0 (4 examples) taken as micro-batches of micro_batch_size."""
    train_set, objective = trainer.stages[stage].train_set, trainer.stages[stage].objective
    indices = D.step_indices(len(train_set), 0, 4, trainer.config.seed, stage)
    batches = [D.collate(train_set, indices[i:i + micro_batch_size], packing=trainer.config.packing)
               for i in range(0, 4, micro_batch_size)]
    trainer.model.zero_grad()
    record = L.run_batches(trainer.lm, objective, batches, trainer.autocast, backward=True)
    return record, {name: p.grad.clone() for name, p in trainer.model.named_parameters()}


# A step of 4 sequences (or pairs) of at most 2 x 20 tokens: the sums accumulation reorders.
STEP_TOKENS = 4 * 2 * 20

ACCUMULATED_OBJECTIVES = {
    "sft": ("sft", {}),
    "rpo": ("dpo", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7]}),  # NLL over the step's tokens
    "kto": ("dpo", {"loss_type": "kto"}),  # KL reference point over the step
    "bco": ("dpo", {"loss_type": "bco"}),
}


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("objective", list(ACCUMULATED_OBJECTIVES))
def test_accumulating_4x1_equals_1x4(tmp_path, objective, packing):
    """Normalising by the step's pairs (DPO) or completion tokens (SFT) makes micro-batching exact."""
    stage, overrides = ACCUMULATED_OBJECTIVES[objective]
    lengths = [1, 7, 2, 5, 3, 9, 4, 6]  # unequal completions, so per-micro-batch token means would differ
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": "q" * n, "chosen": "a" * n, "rejected": "b" * (10 - n)}) + "\n"
                            for n in lengths))
    trainer = L.Trainer(make_config(tmp_path, model="tiny-llama", data=str(path), eval_fraction=0.0,
                                    packing=packing, **overrides))
    trainer.prepare(stage)
    nudge(trainer.model, seed=None)
    objective_state = copy.deepcopy(getattr(trainer.stages[stage].objective, "state_dict", dict)())
    one_by_four, grads_a = _step_gradients(trainer, stage, 4)
    if objective_state:  # BCO's running mean moved on after the step: start the second run from the same point
        trainer.stages[stage].objective.load_state_dict(objective_state)
    four_by_one, grads_b = _step_gradients(trainer, stage, 1)
    assert four_by_one["loss"] == pytest.approx(one_by_four["loss"], rel=1e-6)
    for name, grad in grads_a.items():
        assert grad.abs().max() > 0, name
        assert_fp32_close(grads_b[name], grad, STEP_TOKENS, name)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    straight = make_config(tmp_path, out_dir=str(tmp_path / "straight"), reference="precomputed")
    straight_trainer = L.Trainer(straight)
    straight_trainer.train()

    config = make_config(tmp_path, out_dir=str(tmp_path / "resumed"), reference="precomputed")
    resumed_trainer = interrupted_then_resumed(L.Trainer, config, step=2)

    assert train_records(config.out_dir) == train_records(straight.out_dir)
    for name, tensor in straight_trainer.model.state_dict().items():
        assert torch.equal(resumed_trainer.model.state_dict()[name], tensor), name


def test_checkpoint_from_another_model_or_config_is_refused(tmp_path):
    config = make_config(tmp_path, sft_steps=0, steps=1)
    R.train(config)
    other_model = dataclass_replace(config, resume=True, model_config={**TINY, "hidden_size": 64})
    with pytest.raises(checkpoint.CheckpointMismatch, match="is from another model: parameter"):
        R.train(other_model)
    other_loss = dataclass_replace(config, resume=True, loss_type="ipo")
    with pytest.raises(checkpoint.CheckpointMismatch, match="loss_type: 'sigmoid' -> 'ipo'"):
        R.train(other_loss)
    # Observation-only keys may change on resume.
    R.train(dataclass_replace(config, resume=True, log_every=5, eval_every=3))
    # So may the number of processes for evaluation, but not to resume (the global batch would change).
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    torch.save({**state, "world_size": 2}, tmp_path / "run" / "last.pt")
    with pytest.raises(checkpoint.CheckpointMismatch, match="written by 2 process.*this run has 1"):
        R.train(dataclass_replace(config, resume=True))
    L.evaluate(config)


def test_out_of_memory_names_the_settings_to_lower(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(L, "run_batches", out_of_memory)
    with pytest.raises(L.OutOfMemory, match="lower micro_batch_size.*max_length.*gradient_checkpointing"):
        R.train(make_config(tmp_path))


def test_precomputed_reference_matches_frozen_model_and_is_cached(tmp_path, tiny_model_and_batch):
    config, model, dataset, _ = tiny_model_and_batch
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    batch = D.collate(dataset, [3, 1, 5], packing=False)
    frozen = references.frozen_model(model, "reference", no_autocast)(batch)
    cached = references.precomputed(model, dataset, config, torch.device("cpu"), no_autocast)(batch)
    for a, b in zip(frozen, cached):
        torch.testing.assert_close(a, b)
    assert len(list((tmp_path / "cache").glob("ref_logps-*.pt"))) == 1
