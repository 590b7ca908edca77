"""prefops.training under torchrun's environment: FSDP2 on 2 CPU processes (gloo) equals one process.

The two ranks each train on half of the global step; their summed (reduce-scattered)
gradients must equal those of a single process on the whole step, lm_head included,
which the fused op reads outside any lm_head forward call.
"""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist

from prefops.training import data as D, loop as L

from conftest import assert_fp32_close, assert_records_close
from test_training import make_config
from test_training_listwise import ranked_rows, write_jsonl

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is unavailable")

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    from torch.distributed.tensor import distribute_tensor
except ImportError:  # pragma: no cover - torch < 2.6
    pytestmark = pytest.mark.skip(reason="FSDP2 (torch.distributed.fsdp.fully_shard) is unavailable")

# Per rank: 2 micro-batches of 1 (so gradient sync is skipped on the first); globally 4 pairs.
RANKS, MICRO, ACCUM = 2, 1, 2
# Every gradient element sums one term per token of the global step, in another order across
# ranks than in one process: 4 pairs x 2 sequences x at most 20 tokens (tests/conftest.py).
TOKENS_PER_STEP = 4 * 2 * 20


def _config(tmp_path, case, **overrides):
    lengths = [1, 7, 2, 5, 3, 9, 4, 6]  # unequal, so the NLL term's global token count matters
    path = tmp_path / "pairs.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps({"prompt": "q" * n, "chosen": "a" * n, "rejected": "b" * (10 - n)}) + "\n"
                                for n in lengths))
    values = dict(data=str(path), eval_fraction=0.0, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                  model_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2,
                                "tie_word_embeddings": case == "tied_embeddings"})
    if case == "tdpo":  # the reference's head is gathered by its own FSDP root and copied out
        values.update(loss_type="tdpo1", loss_weights=None)
    if case == "listwise_shared_prompt":  # ragged lists, their NLL term's step-wide length, shared-prompt batches
        values.update(data=write_jsonl(tmp_path / "ranked.jsonl", ranked_rows()), loss_type="all_pairs",
                      loss_weights=None, shared_prompt=True,
                      loss_params={"pairwise_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]})
    return make_config(tmp_path, **{**values, **overrides})


def _step_zero(trainer):
    """Loss record and full gradients after step 0 of the preference stage, on this rank's share."""
    trainer.prepare("dpo")
    train_set, objective = trainer.stages["dpo"].train_set, trainer.stages["dpo"].objective
    with torch.no_grad():  # move off the reference, identically in every layout
        generator = torch.Generator().manual_seed(1)
        for p in trainer.model.parameters():
            delta = 0.05 * torch.randn(p.shape, generator=generator)
            if hasattr(p, "device_mesh"):
                delta = distribute_tensor(delta, p.device_mesh, p.placements)
            p.add_(delta)
    batches = trainer.step_batches(train_set, D.step_indices(len(train_set), 0, MICRO * ACCUM * RANKS, 0, "dpo"))
    record = L.run_batches(trainer.lm, objective, batches, trainer.autocast, backward=True)
    grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for name, p in trainer.model.named_parameters()}
    return record, grads


def _worker(rank, port, tmp_path, results, case):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(RANKS), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        trainer = L.Trainer(_config(tmp_path, case, micro_batch_size=MICRO, grad_accum_steps=ACCUM,
                                    out_dir=str(tmp_path / "step")))
        assert hasattr(trainer.lm, "set_requires_gradient_sync")  # sharded with FSDP2
        record, grads = _step_zero(trainer)
        if rank == 0:
            torch.save({"record": record, "grads": grads}, results)
        # The whole job runs too: SFT, the sharded frozen reference, eval, win rate, checkpoints.
        summary = L.Trainer(_config(tmp_path, case, micro_batch_size=MICRO, grad_accum_steps=ACCUM, sft_steps=1, steps=2,
                                    out_dir=str(tmp_path / "job"),
                                    reference="model" if case == "tdpo" else "precomputed")).train()
        assert (summary != {}) == (rank == 0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("case", ["lm_head", "tied_embeddings", "tdpo", "listwise_shared_prompt"])
def test_two_gloo_ranks_give_the_gradients_of_one_process(tmp_path, case):
    results = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_worker, args=(_free_port(), tmp_path, str(results), case), nprocs=RANKS, join=True)
    distributed = torch.load(results)
    single = L.Trainer(_config(tmp_path, case, micro_batch_size=MICRO * ACCUM * RANKS, out_dir=str(tmp_path / "single")))
    record, grads = _step_zero(single)
    assert_records_close(distributed["record"], record, TOKENS_PER_STEP)
    assert set(grads) == set(distributed["grads"]) and ("lm_head.weight" in grads) == (case != "tied_embeddings")
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        assert_fp32_close(distributed["grads"][name], grad, TOKENS_PER_STEP, name)
    log = [json.loads(line) for line in open(tmp_path / "job" / "log.jsonl")]
    assert [r["step"] for r in log if r["stage"] == "dpo" and r["kind"] == "train"] == [1, 2]
    assert (tmp_path / "job" / "last.pt").exists()
