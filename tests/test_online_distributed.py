"""The online loop under torchrun's environment: 2 CPU processes (gloo; FSDP2, and DDP with data_parallel: ddp)
equal one process.

Each round's prompts are sampled in fixed seeded batches of sample_batch_size, shared
out over the ranks and gathered, so the samples, judgements and pairs do not depend
on the number of ranks, and each optimizer step's global batch is the same: rounds,
judge budgets and rewards match exactly, losses, metrics, diagnostics and the final
weights to fp32 rounding (tests/conftest.py).
"""
import json
import math
import os
import zlib

import pytest
import torch
import torch.distributed as dist

from prefops.training import config as C
from prefops.training.online import OnlineTrainer
from prefops.training.synthetic import TASKS

from conftest import U32, assert_records_close
from test_online import make_config
from test_training_distributed import _free_port

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is unavailable")

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError:  # pragma: no cover - torch < 2.6
    pytestmark = pytest.mark.skip(reason="FSDP2 (torch.distributed.fsdp.fully_shard) is unavailable")

RANKS, MICRO, ACCUM = 2, 1, 2  # per rank; globally 4 pairs a step
# 8 round prompts and 5 evaluation prompts in batches of 2: 4 and 3 sampling batches, so one rank samples
# more evaluation batches than the other.
ONLINE = {"rounds": 2, "prompts_per_round": 8, "samples_per_prompt": 4, "steps_per_round": 2, "eval_prompts": 5,
          "sample_batch_size": 2}
LR = 1e-3
# A step's sums run over 4 pairs x 2 sequences x at most 16 tokens (max_length), in another order
# across ranks than in one process.
TOKENS_PER_STEP = 4 * 2 * 16
STEPS = ONLINE["rounds"] * ONLINE["steps_per_round"]
# Besides counts (integers): what comes of the samples and their judgements, equal, not close.
JUDGED = {"lr", "pair_yield", "reward/mean", "reward/std", "win_rate", "win_rate/vs_start", "win_rate/vs_previous"}


def judge(prompts, completions):
    """The task's scorer, failing (NaN) on a sixth of the completions by their text: whichever rank judges
    them, the same samples fail, so the counts of failures summed over ranks equal one process's."""
    return [math.nan if zlib.crc32(completion.encode()) % 6 == 0 else TASKS["sort"].score(prompt, completion)
            for prompt, completion in zip(prompts, completions)]


def _config(tmp_path, name, case, **overrides):
    # 4 held-out pairs of the task's 64: evaluation drops a remainder that the ranks cannot share evenly.
    online = {**ONLINE, "mixture_alpha": 0.5} if case != "resumed_mid_round" else ONLINE  # samples the reference too
    return make_config(tmp_path, online=online, sft_steps=0, eval_fraction=4 / 64, lr=LR, warmup_steps=0,
                       reference_update="round", out_dir=str(tmp_path / name),
                       data_parallel="ddp" if case == "straight_ddp" else "fsdp", **overrides)


class Interrupted(Exception):
    pass


def _worker(rank, port, tmp_path, case):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(RANKS), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        config = _config(tmp_path, "ranks", case, micro_batch_size=MICRO, grad_accum_steps=ACCUM)
        if case == "resumed_mid_round":  # every rank stops in the second round after its first checkpoint
            save = OnlineTrainer.save_online

            def save_then_stop(trainer, step, *args):
                save(trainer, step, *args)
                if step == 3:
                    raise Interrupted
            with pytest.raises(Interrupted):
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(OnlineTrainer, "save_online", save_then_stop)
                    OnlineTrainer(config, judge=judge).train()
            config = C.from_dict({**C.to_dict(config), "resume": True})
        trainer = OnlineTrainer(config, judge=judge)
        ddp = case == "straight_ddp"  # wrapped in DDP, or sharded with FSDP2
        assert hasattr(trainer.lm, "require_backward_grad_sync" if ddp else "set_requires_gradient_sync")
        trainer.train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _records(out_dir):
    return [{k: v for k, v in record.items() if not k.endswith("_s")}  # wall-clock timings and rates
            for record in map(json.loads, open(out_dir / "log.jsonl"))]


def _assert_record_matches(actual, expected):
    where = f"{expected['kind']} record of step {expected['step']}"
    assert set(actual) == set(expected), where
    exact = {key for key, value in expected.items() if isinstance(value, (int, str)) or key in JUDGED}
    for key in exact:
        assert actual[key] == expected[key], f"{where}: {key}"
    # Every metric but the first step's also comes from weights that differ by the rounding of earlier steps.
    assert_records_close({k: v for k, v in actual.items() if k not in exact},
                         {k: v for k, v in expected.items() if k not in exact},
                         TOKENS_PER_STEP * (1 + expected["step"]))


@pytest.mark.parametrize("case", ["straight", "resumed_mid_round", "straight_ddp"])
def test_two_gloo_ranks_run_the_online_loop_of_one_process(tmp_path, case):
    """straight: mixture sampling with the reference; resumed_mid_round: stopped after step 3 and resumed;
    straight_ddp: straight with data_parallel: ddp."""
    torch.multiprocessing.spawn(_worker, args=(_free_port(), tmp_path, case), nprocs=RANKS, join=True)
    single = OnlineTrainer(_config(tmp_path, "single", case, micro_batch_size=MICRO * ACCUM * RANKS), judge=judge)
    single.train()

    ranks, one = _records(tmp_path / "ranks"), _records(tmp_path / "single")
    rounds = [r for r in one if "round" in r and r["kind"] == "eval"]
    # 8 prompts x 4 samples judged a round; the judge failed on some of the samples of either rank.
    assert [r["judge_calls"] for r in rounds] == [32, 64] and all(r["pairs"] >= 4 for r in rounds)
    assert 0 < rounds[0]["dropped_nan"] < rounds[0]["judge_failed"] < rounds[1]["judge_failed"]
    assert [(r["kind"], r["step"]) for r in ranks] == [(r["kind"], r["step"]) for r in one]
    for actual, expected in zip(ranks, one):
        _assert_record_matches(actual, expected)

    saved, expected = (torch.load(tmp_path / run / "last.pt", weights_only=False) for run in ("ranks", "single"))
    assert saved["step"] == STEPS and saved["online"]["round"]["records"] == expected["online"]["round"]["records"]
    # The references in full (rank 0's shards once went there): the second round's is the policy after step 2.
    for state, reference in zip(saved["online"]["reference_states"], expected["online"]["reference_states"]):
        for name, weight in reference.items():
            assert type(state[name]) is torch.Tensor and state[name].shape == weight.shape, name
    # Final weights: each Adam step's update carries the relative error of its gradient, fp32 sums of
    # TOKENS_PER_STEP terms in another order, and the steps add theirs: normwise against how far they moved.
    start = expected["online"]["reference_states"][0]
    for name, weight in single.model.state_dict().items():
        moved = (weight - start[name]).norm().item()
        assert moved > 0, name
        difference = (saved["model"][name] - weight).norm().item()
        assert difference <= 2 * TOKENS_PER_STEP * STEPS * U32 * moved, (name, difference, moved)
