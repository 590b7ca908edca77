"""Context parallelism on 2 gloo processes: each holds a contiguous share of every packed micro-batch's tokens.

The attention (prefops.attention.ContextShard): each rank runs its share of a pack, cut mid-sequence and
through a shared prompt, all-gathers keys and values in every layer, and must give the single process's
hidden states of its tokens; the parameter gradients summed over the ranks must be the single process's
(the keys' and values' gradients reach their owners through the reduce-scatter).

The trainer (context_parallel: 2): both ranks form one context-parallel group, one data-parallel rank, and
their whole jobs (SFT, the preference stage, evaluations) must log the single process's records step by
step and end with its weights. Combined with data parallelism: 4 processes, 2 data-parallel ranks (FSDP2 or
DDP) of 2 context-parallel ranks each, against one process on the same global batches.
"""
import contextlib
import json
import os
import socket
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import transformers

import prefops.attention as attention
from conftest import U32, assert_records_close, decoder_tolerance, relative_error
from prefops.attention import ContextShard, PackedLayout
from prefops.shared_prompt import build_layout
from prefops.training import config as C, data as D, loop as L
from test_packed_attention import packed, ragged, shared_examples, tiny_model, varlen_by_definition
from test_training import make_config
from test_training_listwise import ranked_rows, write_jsonl

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is unavailable")

RANKS = 2


def _join(rank, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(RANKS), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- the attention

def _packed_case():
    """Five sequences in one row; rank 0 holds 13 tokens, cutting the second sequence after 4 of its 11."""
    ids, positions = packed(ragged([9, 11, 3, 8, 6], seed=21))
    return tiny_model(seed=11), ids, positions, None, PackedLayout.from_position_ids(positions), 13


def _shared_case():
    """A flat shared-prompt pack cut inside the second example's prompt: its responses on rank 1 read keys
    of rank 0, and the gradients of those keys add up over both ranks' queries."""
    layout = build_layout(*shared_examples([2, 3, 1], seed=22), packing="flat")
    first = layout.document_ids[0].tolist().index(1)
    return (tiny_model(seed=12), layout.input_ids, layout.position_ids, layout, PackedLayout.from_shared_prompt(layout),
            first + 2)


def _sliding_case():
    """A sliding window of 4 keys (Mistral) over sequences cut mid-way: a query's window reaches across the cut."""
    ids, positions = packed(ragged([12, 10, 7], seed=23))
    model = tiny_model(transformers.MistralModel, transformers.MistralConfig, seed=13, sliding_window=4)
    return model, ids, positions, None, PackedLayout.from_position_ids(positions), 16


# name: (case, whether the rank runs flash-attn's varlen path, with the kernel replaced by its definition so
# that its arguments for a share, the pieces' cu_seqlens and gathered keys, run without a GPU)
ATTENTION_CASES = {"packed": (_packed_case, False), "shared_prompt": (_shared_case, False),
                   "sliding_window": (_sliding_case, False), "shared_prompt_flash": (_shared_case, True),
                   "sliding_window_flash": (_sliding_case, True)}


def _flash_plumbing(on):
    if not on:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(attention, "_use_flash", lambda query, value: True))
    stack.enter_context(mock.patch.object(attention, "_flash_varlen", lambda: varlen_by_definition))
    return stack


def _hidden_and_grads(model, ids, positions, layout, start=0, stop=None):
    """Hidden states of the tokens start..stop-1 and the parameter gradients of <hidden, upstream>."""
    hidden = model(input_ids=ids[:, start:stop], position_ids=positions[:, start:stop], prefops_layout=layout,
                   use_cache=False).last_hidden_state
    upstream = torch.randn(1, ids.shape[1], hidden.shape[-1], generator=torch.Generator().manual_seed(5))
    (hidden * upstream[:, start:stop]).sum().backward()
    return hidden.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _attention_worker(rank, port, out_dir):
    _join(rank, port)
    try:
        group = dist.new_group(list(range(RANKS)))
        results = {}
        for name, (case, flash) in ATTENTION_CASES.items():
            model, ids, positions, _, blocks, cut = case()
            with pytest.raises(ValueError, match="consecutive non-empty spans"):
                ContextShard(blocks, group, [(0, cut), (cut + 1, ids.shape[1])])
            shard = ContextShard(blocks, group, [(0, cut), (cut, ids.shape[1])])
            with _flash_plumbing(flash):
                hidden, grads = _hidden_and_grads(model, ids, positions, shard, *shard.span)
            dist.all_reduce(grads)
            results[name] = hidden, grads
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_context_parallel_attention_equals_one_process(tmp_path):
    torch.multiprocessing.spawn(_attention_worker, args=(_free_port(), str(tmp_path)), nprocs=RANKS, join=True)
    shards = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(RANKS)]
    for name, (case, _) in ATTENTION_CASES.items():
        model, ids, positions, layout, blocks, cut = case()
        hidden, grads = _hidden_and_grads(model, ids, positions, blocks if layout is None else layout)
        length = ids.shape[1]  # also the tokens each gradient sums over
        # Two fp32 computations of the same attention, each within the decoder's tolerance of float64.
        assert relative_error(torch.cat([shard[name][0] for shard in shards], 1), hidden) <= \
            2 * decoder_tolerance(model.config, length), name
        assert relative_error(shards[0][name][1], grads) <= \
            2 * decoder_tolerance(model.config, length, tokens=length), name
        assert torch.equal(shards[0][name][1], shards[1][name][1])


# ----------------------------------------------------------------------------- the trainer

def _pairs(tmp_path):
    """Pairs of ragged lengths: a micro-batch's halves end inside a sequence."""
    path = tmp_path / "pairs.jsonl"
    lengths = [1, 7, 2, 5, 3, 9, 4, 6, 8, 2, 5, 3]
    path.write_text("".join(json.dumps({"prompt": "q" * n, "chosen": "a" * (n % 4 + 1), "rejected": "b" * (11 - n)})
                            + "\n" for n in lengths))
    return str(path)


# Each case covers an objective's own sums: the SFT and NLL token counts, KTO's completions (a share of each
# completion's sub-batch), its KL term and precomputed reference (whole micro-batches on every rank), listwise
# ranked lists packed behind a shared prompt.
JOBS = {
    "sigmoid_sft": lambda tmp_path: dict(data=_pairs(tmp_path), loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                                         packing=True, sft_steps=1),
    # DDP instead of FSDP2 over the ranks: each rank's gradient is its share of the micro-batch's, summed by DDP.
    "sigmoid_sft_ddp": lambda tmp_path: dict(data=_pairs(tmp_path), loss_type=["sigmoid", "sft"],
                                             loss_weights=[1.0, 0.5], packing=True, data_parallel="ddp"),
    "kto": lambda tmp_path: dict(data=_pairs(tmp_path), loss_type="kto", packing=True, loss_impl="reference",
                                 reference="precomputed"),
    "listwise_shared_prompt": lambda tmp_path: dict(
        data=write_jsonl(tmp_path / "ranked.jsonl", _long_prompts(ranked_rows(12))), loss_type="all_pairs",
        shared_prompt=True, micro_batch_size=1, grad_accum_steps=4, max_length=40,
        loss_params={"pairwise_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
}


def _long_prompts(rows):
    """Every other prompt longer than its completions: a rank whose share of the pack is prompt tokens only
    holds no scored token (the last prompt token predicts the completions' first ones)."""
    return [dict(row, prompt=row["prompt"] + "9" * 16) if i % 2 == 0 else row for i, row in enumerate(rows)]


def _job_config(tmp_path, case, name, **overrides):
    # Weights 10x the usual initial scale give attention that depends on positions: tokens are not averaged.
    values = dict(model_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.2},
                  eval_fraction=0.25, sft_steps=0, steps=2, micro_batch_size=2, grad_accum_steps=2, eval_every=1,
                  eval_batches=2, lr=1e-2, sft_lr=1e-2, warmup_steps=1, checkpoint_every=100,
                  out_dir=str(tmp_path / case / name), ref_cache_dir=str(tmp_path / case / name / "cache"))
    return make_config(tmp_path, **{**values, **JOBS[case](tmp_path), **overrides})


def _trainer_worker(rank, port, tmp_path):
    _join(rank, port)
    try:
        for case in JOBS:
            config = _job_config(tmp_path, case, "context_parallel", context_parallel=RANKS)
            trainer = L.Trainer(config)
            trainer.train()
            if rank == 0:  # a micro-batch of the first step is cut inside a sequence (or a prompt)
                shares = trainer.step_batches(trainer.stages["dpo"].train_set, list(range(config.batch_size)))
                assert any(begin < share.shard.span[1] < end for share in shares
                           for begin, end, _ in share.shard.layout.blocks), case
                assert case != "listwise_shared_prompt" or any(
                    bool((share.targets == D.IGNORE_INDEX).all()) for share in shares), case
    finally:
        dist.destroy_process_group()


def _records(out_dir):
    """The logged records without timings and the path that ran (under a sequence group the chunk
    plans must agree across ranks, so the stored path is not taken: prefops.chunks.plan_budget)."""
    return [{key: value for key, value in json.loads(line).items() if not key.endswith("_per_s") and key != "path"}
            for line in open(out_dir / "log.jsonl")]


def _assert_job_matches(tmp_path, case, name, weights=True, **single):
    """The run out_dir case/name logged one process's records step by step and (weights) ended with its weights."""
    config = _job_config(tmp_path, case, "one_process", **single)
    trainer = L.Trainer(config)
    initial = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    trainer.train()
    sharded, one = _records(tmp_path / case / name), _records(tmp_path / case / "one_process")
    terms = config.batch_size * 4 * config.max_length  # a step's sums: examples of at most 4 sequences
    assert [(r["stage"], r["kind"], r["step"]) for r in sharded] == [(r["stage"], r["kind"], r["step"]) for r in one]
    for got, want in zip(sharded, one):
        exact = {key: value for key, value in want.items() if not isinstance(value, float) or key == "lr"}
        assert {key: got[key] for key in exact} == exact, case
        assert_records_close({key: value for key, value in got.items() if key not in exact},
                             {key: value for key, value in want.items() if key not in exact}, terms)
    if not weights:
        return terms
    # AdamW divides each gradient element by its RMS over the steps, so an element's update carries the
    # element's relative error through both (twice), and a small element's exceeds the tensor's normwise
    # error of the sums, 2 terms u32 (measured: up to 0.6 of it); a wrong key, position or share of a sum
    # moves the updates by their own size.
    final = [torch.load(tmp_path / case / run / "last.pt", weights_only=False)["model"]
             for run in (name, "one_process")]
    for key, value in final[1].items():
        assert relative_error(final[0][key], value, scale=value - initial[key]) <= 4 * 2 * terms * U32, f"{case}: {key}"
    return terms


def test_context_parallel_training_equals_one_process(tmp_path):
    torch.multiprocessing.spawn(_trainer_worker, args=(_free_port(), tmp_path), nprocs=RANKS, join=True)
    for case in JOBS:
        terms = _assert_job_matches(tmp_path, case, "context_parallel")
    # One process evaluates a run that shared its batches (context_parallel is free to change): its last evaluation.
    run = tmp_path / "listwise_shared_prompt" / "context_parallel"
    record, logged = L.evaluate(None, run / "last.pt", {"context_parallel": 1}), _records(run)[-1]
    assert [record[key] for key in ("stage", "kind", "step")] == [logged[key] for key in ("stage", "kind", "step")]
    assert_records_close({key: value for key, value in record.items() if isinstance(value, float)},
                         {key: value for key, value in logged.items() if isinstance(value, float)}, terms)


# 4 of the 12 pairs held out: an evaluation the 2 data-parallel ranks share evenly (else it drops the remainder).
EVEN_EVAL = {"eval_fraction": 1 / 3}


def _combined_worker(rank, port, tmp_path, data_parallel):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(2 * RANKS), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        L.Trainer(_job_config(tmp_path, "sigmoid_sft", data_parallel, context_parallel=RANKS,
                              data_parallel=data_parallel, **EVEN_EVAL)).train()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("data_parallel", ["fsdp", "ddp"])
def test_data_and_context_parallel_training_equals_one_process(tmp_path, data_parallel):
    """4 processes: 2 data-parallel ranks, each a context-parallel group of 2 sharing its micro-batches."""
    torch.multiprocessing.spawn(_combined_worker, args=(_free_port(), tmp_path, data_parallel), nprocs=2 * RANKS,
                                join=True)
    config = _job_config(tmp_path, "sigmoid_sft", data_parallel)
    # Every step's loss, metrics and gradient norm, not the final weights: across data-parallel ranks the
    # gradient sums run in another order, and AdamW turns the rounding of an element whose gradient is near 0
    # into a sizeable part of its update (measured: up to 3.6e-4 on updates of about 1e-2, 3% of one step).
    _assert_job_matches(tmp_path, "sigmoid_sft", data_parallel, weights=False,
                        micro_batch_size=2 * config.micro_batch_size, **EVEN_EVAL)


def test_context_parallel_needs_packed_batches_prefops_attention_and_its_processes(tmp_path):
    with pytest.raises(C.ConfigError, match="context_parallel must be a positive integer"):
        make_config(tmp_path, context_parallel=0)
    with pytest.raises(C.ConfigError, match="context_parallel cuts .* set packing: true"):
        make_config(tmp_path, context_parallel=2)
    with pytest.raises(C.ConfigError, match="context_parallel needs attn_implementation prefops .* got 'sdpa'"):
        make_config(tmp_path, context_parallel=2, packing=True, attn_implementation="sdpa")
    with pytest.raises(C.ConfigError, match="train online without context_parallel"):
        make_config(tmp_path, context_parallel=2, packing=True, data="synthetic:addition", online={"rounds": 1})
    with pytest.raises(ValueError, match="needs a multiple of 2 processes .* or context_parallel: 1; this run has 1"):
        L.Trainer(make_config(tmp_path, context_parallel=2, packing=True))
