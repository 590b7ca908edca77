"""Plain DistributedDataParallel on 2 CPU processes (gloo): every gradient, lm_head included, equals one process's.

The fused loss reads the lm_head weight outside any lm_head forward, so only the top-level call of the
DDP wrapper arms DDP's reducer: a path that runs the loss on the unwrapped model (TRL 1.14's fused
path did) leaves every rank with the gradient of its own half of the batch, silently. Each test runs
the right call and a planted unwrapped one, and requires the first to match one process on the whole
batch and the second to be caught.

The prefops trainer (training/) is not tested here: under torchrun it always shards with FSDP2
(training/distributed.shard), which tests/test_training_distributed.py covers; it has no plain DDP mode.
"""
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import prefops.integrations.hf as hf
from conftest import assert_fp32_close
from test_hf_integration import LENGTH, padded_batch, tiny
from test_training_distributed import _free_port

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is unavailable")

RANKS, PAIRS = 2, 4  # each rank scores 2 of the 4 pairs
# Each gradient element sums one term per token of the batch, in another order across the ranks
# (and DDP's averaging) than in one process.
TOKENS = PAIRS * 2 * LENGTH
# (tied embeddings, find_unused_parameters, the planted unwrapped call)
CASES = {"lm_head": (False, False, False), "tied_embeddings": (True, False, False),
         "find_unused_parameters": (False, True, False), "planted_unwrapped": (False, False, True)}


def _model(tied):
    import transformers
    return tiny(transformers.LlamaConfig, transformers.LlamaForCausalLM, tie_word_embeddings=tied)


def _rank_share(batch, rank):
    """Rank `rank`'s pairs of a [chosen; rejected] batch, in the same layout."""
    share = PAIRS // RANKS
    pairs = torch.arange(rank * share, (rank + 1) * share)
    rows = torch.cat([pairs, pairs + PAIRS])
    return {key: value[pairs if key.startswith("ref_") else rows] for key, value in batch.items()}


_wrapped_forward = hf._forward


def _unwrapped_forward(model, *args, **kwargs):
    return _wrapped_forward(hf.unwrap_model(model), *args, **kwargs)


def _init(rank, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(RANKS), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)


def _preference_loss_worker(rank, port, out):
    _init(rank, port)
    try:
        batch = _rank_share(padded_batch(0, pairs=PAIRS), rank)
        grads = {}
        for case, (tied, find_unused, planted) in CASES.items():
            model = DistributedDataParallel(_model(tied), find_unused_parameters=find_unused)
            with pytest.MonkeyPatch.context() as patch:
                if planted:
                    patch.setattr(hf, "_forward", _unwrapped_forward)
                loss, _ = hf.preference_loss(model, batch)
            loss.backward()
            grads[case] = {name: p.grad.clone() for name, p in model.module.named_parameters()}
        torch.save(grads, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _assert_ranks_match_one_process(ranks, single):
    for name in single:
        assert single[name].abs().max() > 0, name
        # All-reduced buckets: every rank holds the same bits.
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert_fp32_close(ranks[0][name], single[name], TOKENS, name)


def _assert_planted_is_caught(ranks, single):
    """Each rank kept the gradient of its own half: the ranks disagree, and neither is one process's."""
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert not torch.equal(ranks[0][name], ranks[1][name]), name
        for grads in ranks:
            with pytest.raises(AssertionError):
                assert_fp32_close(grads[name], single[name], TOKENS, name)
    # DDP's average of the two local gradients would have been right: only the all-reduce was missing.
    assert_fp32_close((ranks[0]["lm_head.weight"] + ranks[1]["lm_head.weight"]) / 2, single["lm_head.weight"],
                      TOKENS, "lm_head.weight")


def test_preference_loss_under_ddp_equals_one_process(tmp_path):
    out = tmp_path / "grads"
    torch.multiprocessing.spawn(_preference_loss_worker, args=(_free_port(), str(out)), nprocs=RANKS, join=True)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(RANKS)]
    batch = padded_batch(0, pairs=PAIRS)
    for case, (tied, _, planted) in CASES.items():
        model = _model(tied)
        hf.preference_loss(model, batch)[0].backward()
        single = {name: p.grad for name, p in model.named_parameters()}
        per_rank = [grads[case] for grads in ranks]
        assert all(set(grads) == set(single) for grads in per_rank), case
        assert ("lm_head.weight" in single) == (not tied), case  # tied: the head's gradient is the embedding's
        if planted:
            _assert_planted_is_caught(per_rank, single)
        else:
            _assert_ranks_match_one_process(per_rank, single)
