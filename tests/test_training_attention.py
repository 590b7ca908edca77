"""The trainer's attention and activations: packed and shared-prompt steps run attn_implementation="prefops"
(no T x T mask) by default and equal the padded step; activation_offload leaves the gradients as they are."""
import json

import pytest
import torch

import prefops.attention
from conftest import assert_fp32_close
from helpers import nudge
from prefops.memory import AllocationRecorder
from prefops.training import config as C, data as D, loop as L
from test_training import STEP_TOKENS, make_config

LENGTHS = [1, 7, 2, 5, 3, 9, 4, 6]  # ragged prompts and completions


def trainer_for(tmp_path, scale=1, **overrides):
    """A DPO trainer on 8 ragged pairs (`scale` times longer), moved off its reference so the loss is not at its
    symmetric point."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": "q" * n * scale, "chosen": "a" * n * scale,
                                        "rejected": "b" * (10 - n) * scale}) + "\n"
                            for n in LENGTHS))
    trainer = L.Trainer(make_config(tmp_path, model="tiny-llama", data=str(path), eval_fraction=0.0,
                                    max_length=20 * scale, **overrides))
    trainer.prepare("dpo")
    nudge(trainer.model)
    return trainer


def step(trainer, batch):
    trainer.model.zero_grad()
    record = L.run_batches(trainer.lm, trainer.stages["dpo"].objective, [batch], trainer.autocast, backward=True)
    return record, {name: p.grad.clone() for name, p in trainer.model.named_parameters()}


def batch_of(trainer, layout):
    train_set = trainer.stages["dpo"].train_set
    return D.collate(train_set, list(range(4)), packing=layout == "packed", shared_prompt=layout == "shared")


def test_config_chooses_prefops_for_packed_layouts():
    assert C.attention_implementation(C.load(None, {})) == "sdpa"
    assert C.attention_implementation(C.load(None, {"packing": True})) == "prefops"
    assert C.attention_implementation(C.load(None, {"shared_prompt": True})) == "prefops"
    assert C.attention_implementation(C.load(None, {"packing": True, "attn_implementation": "eager"})) == "eager"
    assert C.attention_implementation(C.load(None, {"shared_prompt": True, "attn_implementation": "prefops"})) \
        == "prefops"
    with pytest.raises(C.ConfigError, match="attn_implementation must be one of None, prefops, sdpa"):
        C.load(None, {"attn_implementation": "sdpa2"})


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_packed_steps_run_prefops_attention_and_equal_the_padded_step(tmp_path, monkeypatch, layout):
    """The trainer builds a packed or shared-prompt model on prefops attention, whose blocks carry the step
    (a spy counts them), and its loss, metrics and gradients are the padded (SDPA, per-row mask) step's."""
    padded = trainer_for(tmp_path / "padded")
    trainer = trainer_for(tmp_path / layout, packing=layout == "packed", shared_prompt=layout == "shared")
    assert padded.model.config._attn_implementation == "sdpa"
    assert trainer.model.config._attn_implementation == "prefops"
    blocks = []
    run_blocks = prefops.attention._sdpa_blocks
    monkeypatch.setattr(prefops.attention, "_sdpa_blocks",
                        lambda *args: blocks.append(len(args[3].blocks)) or run_blocks(*args))
    expected, expected_grads = step(padded, batch_of(padded, "padded"))
    assert not blocks
    record, grads = step(trainer, batch_of(trainer, layout))
    layers = trainer.model.config.num_hidden_layers
    # a block per sequence (8), or per prompt and response (4 + 8), in each layer of the reference and the policy
    assert blocks == [8 if layout == "packed" else 12] * 2 * layers
    assert_fp32_close(torch.tensor(record["loss"]), torch.tensor(expected["loss"]), STEP_TOKENS, "loss")
    for name, grad in expected_grads.items():
        assert grad.abs().max() > 0, name
        assert_fp32_close(grads[name], grad, STEP_TOKENS, name)


def test_packed_step_allocates_no_tokens_squared_tensor(tmp_path):
    """Forward and backward of a packed step of ~300 tokens on prefops attention stay below T x T / 4 per
    tensor ([T, intermediate] activations at most); the same step on SDPA builds transformers' [T, T] packed mask
    (the control)."""
    trainer = trainer_for(tmp_path, scale=4, packing=True)
    batch = batch_of(trainer, "packed")
    tokens = batch.input_ids.numel()

    def largest():
        recorder = AllocationRecorder()
        with recorder:
            step(trainer, batch)
        return max(numel for _, numel, _ in recorder.sizes)

    assert largest() < tokens * tokens / 4
    trainer.model.config._attn_implementation = "sdpa"
    assert largest() >= tokens * tokens


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_offload_keeps_the_gradients(tmp_path, monkeypatch, checkpointing):
    """activation_offload: saved activations go through save_on_cpu (unpinned without CUDA); the step's loss and
    gradients are bitwise those without it. On a CPU the 'offload' is CPU to CPU and saves no memory."""
    calls = []
    save_on_cpu = torch.autograd.graph.save_on_cpu
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", lambda **options: calls.append(options)
                        or save_on_cpu(**options))
    plain = trainer_for(tmp_path / "plain", gradient_checkpointing=checkpointing)
    expected, expected_grads = step(plain, batch_of(plain, "padded"))
    assert not calls
    offloaded = trainer_for(tmp_path / "offload", gradient_checkpointing=checkpointing, activation_offload=True)
    record, grads = step(offloaded, batch_of(offloaded, "padded"))
    assert calls and all(options == {"pin_memory": False} for options in calls)
    assert record["loss"] == expected["loss"]
    for name, grad in expected_grads.items():
        assert torch.equal(grads[name], grad), name
