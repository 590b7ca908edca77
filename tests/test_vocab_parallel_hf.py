"""transformers' tensor parallelism (tp_plan="auto": every weight a DTensor, the lm_head Shard(0) over the
vocabulary) through prefops.integrations.hf.preference_loss on 2 gloo ranks: the loss, the metrics and
every parameter's gradient (gathered) equal one process's on the same tiny Llama, the reference model
tensor-parallel too.
"""
import os

import pytest
import torch
import torch.distributed as dist
import transformers

import prefops
from conftest import assert_fp32_close, assert_records_close
from prefops.integrations.hf import preference_loss
from test_vocab_parallel import spawn

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is unavailable")

RANKS = 2
VOCAB = 54


def save_llama(path, seed, vocab=VOCAB, heads=4):
    """A tiny Llama whose heads and vocabulary split over the tensor-parallel ranks."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=heads, head_dim=4,
                                      max_position_embeddings=32, tie_word_embeddings=False, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # logits of a few units
    model.save_pretrained(path)


def load(path, tensor_parallel):
    if not tensor_parallel:
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, distributed_config=transformers.DistributedConfig(tp_plan="auto"))


def batch():
    """Two pairs, left-padded, completions of 4 and 5 tokens."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(1, VOCAB, (4, 11), generator=generator)
    mask = torch.ones(4, 11, dtype=torch.long)
    mask[1, :2] = 0
    mask[3, :1] = 0
    completion = torch.zeros(4, 11, dtype=torch.long)
    completion[:, 7:] = 1
    completion[2:, 6] = 1
    return dict(input_ids=ids * mask, attention_mask=mask, completion_mask=completion)


def run(directory, tensor_parallel):
    model, ref_model = (load(os.path.join(directory, name), tensor_parallel) for name in ("policy", "reference"))
    loss, metrics = preference_loss(model, batch(), prefops.PreferenceLoss("sigmoid", beta=0.3, token_metrics=True),
                                    ref_model=ref_model)
    loss.backward()
    # Under tensor parallelism the sharded weights' gradients are DTensors, the norms' plain tensors.
    grads = {name: getattr(parameter.grad, "full_tensor", lambda grad=parameter.grad: grad)()
             for name, parameter in model.named_parameters()}
    sharded = type(model.lm_head.weight).__name__, tuple(model.lm_head.weight.to_local().shape) \
        if tensor_parallel else None
    return loss.detach(), {key: float(value) for key, value in metrics.items()}, grads, sharded


def _worker(rank, world, directory):
    torch.save(run(directory, True), os.path.join(directory, f"rank{rank}.pt"))


def test_tp_plan_auto_preference_loss_equals_one_process(tmp_path):
    save_llama(tmp_path / "policy", 0)
    save_llama(tmp_path / "reference", 1)
    spawn(_worker, RANKS, str(tmp_path))
    loss, metrics, grads, _ = run(str(tmp_path), False)
    tokens = 4 * 11 + VOCAB
    for rank in range(RANKS):
        rank_loss, rank_metrics, rank_grads, sharded = torch.load(tmp_path / f"rank{rank}.pt")
        assert sharded == ("DTensor", (VOCAB // RANKS, 16))  # the head really was split
        assert_fp32_close(rank_loss, loss, tokens, f"loss on rank {rank}")
        assert_records_close(rank_metrics, metrics, tokens)
        for name, grad in grads.items():
            # Through the decoder: a sum over the tokens and the layers' widths, in another order.
            assert_fp32_close(rank_grads[name], grad, 4 * tokens, f"grad of {name} on rank {rank}")


def trainer_step(directory, tensor_parallel):
    """PrefopsDPOTrainer.compute_loss on the first batch of test_trl_integration's data (its character
    tokenizer), and the gradients of every parameter (gathered)."""
    from test_trl_integration import PAIRS, config, dataset, tokenizer

    from prefops.integrations.trl import PrefopsDPOTrainer

    model, ref_model = (load(os.path.join(directory, name), tensor_parallel) for name in ("policy", "reference"))
    out = os.path.join(directory, f"trainer{dist.get_rank() if tensor_parallel else ''}")
    trainer = PrefopsDPOTrainer(model=model, ref_model=ref_model, args=config(out), train_dataset=dataset("tp"),
                                processing_class=tokenizer())
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)]))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: getattr(parameter.grad, "full_tensor", lambda grad=parameter.grad: grad)()
             for name, parameter in model.named_parameters()}
    return loss.detach(), {key: values[-1] for key, values in trainer._metrics["train"].items()}, grads


def _trainer_worker(rank, world, directory):
    # accelerate 1.16 refuses the ParallelismConfig that transformers' Trainer sets for a model with
    # tp_size > 1 on CPUs ("only compatible DistributedType.FSDP (version 2) or DistributedType.Multi{Device}
    # or DistributedType.DEEPSPEED, but got DistributedType.MULTI_CPU"): its check is skipped here so that the
    # trainer's loss can run on gloo. Nothing else of accelerate is changed; train() is not called.
    from accelerate.parallelism_config import ParallelismConfig

    ParallelismConfig._validate_accelerator = lambda self, accelerator: None
    torch.save(trainer_step(directory, True), os.path.join(directory, f"trainer_rank{rank}.pt"))


def test_tp_plan_auto_prefops_dpo_trainer_equals_one_process(tmp_path):
    pytest.importorskip("trl")
    from test_trl_integration import tokenizer

    vocab = len(tokenizer())
    save_llama(tmp_path / "policy", 2, vocab=vocab)
    save_llama(tmp_path / "reference", 3, vocab=vocab)
    spawn(_trainer_worker, RANKS, str(tmp_path))
    loss, metrics, grads = trainer_step(str(tmp_path), False)
    tokens = 4 * 16 + vocab
    for rank in range(RANKS):
        rank_loss, rank_metrics, rank_grads = torch.load(tmp_path / f"trainer_rank{rank}.pt")
        assert_fp32_close(rank_loss, loss, tokens, f"loss on rank {rank}")
        assert_records_close(rank_metrics, metrics, tokens)
        for name, grad in grads.items():
            assert_fp32_close(rank_grads[name], grad, 4 * tokens, f"grad of {name} on rank {rank}")
