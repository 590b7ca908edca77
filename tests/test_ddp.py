"""Plain DistributedDataParallel on 2 CPU processes (gloo): every gradient, lm_head included, equals one process's.

The fused loss reads the lm_head weight outside any lm_head forward, so only the top-level call of the
DDP wrapper arms DDP's reducer: a path that runs the loss on the unwrapped model (TRL 1.14's fused
path did) leaves every rank with the gradient of its own half of the batch, silently. Each test runs
the right call and a planted unwrapped one, and requires the first to match one process on the whole
batch and the second to be caught.

PrefopsDPOTrainer and PrefopsOnlineDPOTrainer run TRL's training loop as torchrun would start it:
accelerate reads the environment, runs MULTI_CPU on gloo and wraps the policy in DDP. The online
trainer's sampling is replaced by completions that depend on the prompt alone, so that both layouts
score the same pairs; its loss path (TRL's training_step into the fused _forward) is TRL's.

The prefops trainer (training/) with data_parallel: ddp wraps its FusedLM in DDP (training/distributed.replicate);
its default, FSDP2, is tested in tests/test_training_distributed.py. Its planted bug runs the step on the
unwrapped FusedLM.
"""
import os

import pytest
import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel

import prefops.integrations.hf as hf
from conftest import assert_fp32_close, assert_records_close
from test_hf_integration import LENGTH, padded_batch, tiny
from test_training_distributed import _free_port

pytestmark = [pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with gloo is unavailable"), pytest.mark.slow]

RANKS, PAIRS = 2, 4  # each rank scores 2 of the 4 pairs
# Each gradient element sums one term per token of the batch, in another order across the ranks
# (and DDP's averaging) than in one process: 2 sequences a pair of at most LENGTH tokens.
TOKENS = PAIRS * 2 * LENGTH
# (tied embeddings, find_unused_parameters, the planted unwrapped call). find_unused_parameters walks the
# graph from the forward's outputs: it must reach the lm_head through the empty logits.
CASES = {"lm_head": (False, False, False), "tied_embeddings": (True, False, False),
         "find_unused_parameters": (False, True, False), "planted_unwrapped": (False, False, True)}


def _model(tied):
    return tiny(transformers.LlamaConfig, transformers.LlamaForCausalLM, tie_word_embeddings=tied)


def _rank_share(batch, rank):
    """Rank `rank`'s pairs of a [chosen; rejected] batch, in the same layout."""
    share = PAIRS // RANKS
    pairs = torch.arange(rank * share, (rank + 1) * share)
    rows = torch.cat([pairs, pairs + PAIRS])
    return {key: value[pairs if key.startswith("ref_") else rows] for key, value in batch.items()}


_wrapped_forward = hf._forward


def _unwrapped_forward(model, *args, **kwargs):
    """The planted bug: the policy's forward skips the DDP wrapper."""
    return _wrapped_forward(hf.unwrap_model(model), *args, **kwargs)


def _torchrun_environment(rank, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(RANKS), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _preference_loss_worker(rank, port, out):
    _torchrun_environment(rank, port)
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
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


def _assert_ranks_match_one_process(ranks, single, terms):
    for name in single:
        assert single[name].abs().max() > 0, name
        # All-reduced buckets: every rank holds the same bits.
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert_fp32_close(ranks[0][name], single[name], terms, name)


def _assert_planted_is_caught(ranks, single, terms, divisor):
    """Each rank kept the gradient of its own half: the ranks disagree, and neither is one process's."""
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert not torch.equal(ranks[0][name], ranks[1][name]), name
        for grads in ranks:
            with pytest.raises(AssertionError):
                assert_fp32_close(grads[name], single[name], terms, name)
    # The all-reduce (DDP's mean, or the prefops trainer's sum: divisor) would have been right: only it was missing.
    assert_fp32_close((ranks[0]["lm_head.weight"] + ranks[1]["lm_head.weight"]) / divisor, single["lm_head.weight"],
                      terms, "lm_head.weight")


def _assert_cases(ranks, single, case, planted, terms, divisor=RANKS):
    per_rank = [grads[case] for grads in ranks]
    assert all(set(grads) == set(single) for grads in per_rank), case
    if planted:
        _assert_planted_is_caught(per_rank, single, terms, divisor)
    else:
        _assert_ranks_match_one_process(per_rank, single, terms)


def test_preference_loss_under_ddp_equals_one_process(tmp_path):
    out = tmp_path / "grads"
    torch.multiprocessing.spawn(_preference_loss_worker, args=(_free_port(), str(out)), nprocs=RANKS, join=True)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(RANKS)]
    batch = padded_batch(0, pairs=PAIRS)
    for case, (tied, _, planted) in CASES.items():
        model = _model(tied)
        hf.preference_loss(model, batch)[0].backward()
        single = {name: p.grad for name, p in model.named_parameters()}
        assert ("lm_head.weight" in single) == (not tied), case  # tied: the head's gradient is the embedding's
        _assert_cases(ranks, single, case, planted, TOKENS)


# ----------------------------------------------------------------------------- TRL's trainers

# Under torchrun's environment with use_cpu, accelerate runs MULTI_CPU on gloo and wraps the policy in DDP.
# The planted bug hands the trainer's loss path the unwrapped policy, as TRL 1.14's fused path did.
TRL_CASES = {"wrapped": False, "planted_unwrapped": True}
# DPO: prompts of 2-5 characters, completions of 2-8 plus EOS (tests/test_trl_integration.dataset).
DPO_TOKENS = PAIRS * 2 * (5 + 8 + 1)
# Online DPO: prompts and completions of one length each, so no padding. The fused forward takes
# positions from the columns, as TRL's does: left padding would shift them by how the prompts are
# batched, which differs between the layouts.
PROMPT_LENGTH, COMPLETION_LENGTH = 4, 5
ONLINE_TOKENS = PAIRS * 2 * (PROMPT_LENGTH + COMPLETION_LENGTH)


def _keep_gradients(grads):
    """A callback that copies the gradients the optimizer is about to apply into `grads`."""
    class KeepGradients(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({name: p.grad.clone() for name, p in model.named_parameters()})
    return KeepGradients()


def _policy_and_reference(vocab):
    return [tiny(transformers.LlamaConfig, transformers.LlamaForCausalLM, logit_gain=10.0, seed=seed,
                 vocab_size=vocab, tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=1)
            for seed in (0, 1)]


def _dpo_trainer(tmp_path, per_device, grads):
    """A PrefopsDPOTrainer on 4 pairs: one step over both ranks."""
    from test_trl_integration import config, dataset, tokenizer

    from prefops.integrations.trl import PrefopsDPOTrainer

    model, reference = _policy_and_reference(len(tokenizer()))
    # max_grad_norm=0: no clipping, so the gradients are the loss's own.
    args = config(tmp_path, per_device_train_batch_size=per_device, max_steps=1, max_grad_norm=0.0)
    return PrefopsDPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dataset("ddp"),
                             processing_class=tokenizer(), callbacks=[_keep_gradients(grads)])


def _prompts():
    from test_trl_integration import CHARS
    g = torch.Generator().manual_seed(0)
    return ["".join(CHARS[int(i)] for i in torch.randint(0, len(CHARS), (PROMPT_LENGTH,), generator=g))
            for _ in range(PAIRS)]


def _sampled(self, model, prompts, images=None):
    """Two completions per prompt that depend on the prompt alone, not on which rank samples them or its RNG."""
    import zlib
    prompt_ids = self.processing_class(text=prompts, return_tensors="pt", add_special_tokens=False)["input_ids"]
    completion_ids = torch.stack([
        torch.randint(3, len(self.processing_class), (COMPLETION_LENGTH,),
                      generator=torch.Generator().manual_seed(zlib.crc32(f"{copy}{prompt}".encode())))
        for copy in range(2) for prompt in prompts])
    return (prompt_ids.repeat(2, 1), torch.ones_like(prompt_ids).repeat(2, 1), completion_ids,
            torch.ones_like(completion_ids), None)


def _online_trainer(tmp_path, per_device, grads):
    """A PrefopsOnlineDPOTrainer on 4 prompts (one step over both ranks), sampling with _sampled."""
    from datasets import Dataset
    from test_trl_integration import tokenizer
    from test_trl_online import reward
    from trl.experimental.online_dpo import OnlineDPOConfig

    from prefops.integrations.trl import PrefopsOnlineDPOTrainer

    model, reference = _policy_and_reference(len(tokenizer()))
    args = OnlineDPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=per_device, max_steps=1,
                           max_grad_norm=0.0, report_to="none", use_cpu=True, bf16=False, beta=0.3,
                           max_new_tokens=COMPLETION_LENGTH, max_length=64, save_strategy="no")
    trainer = PrefopsOnlineDPOTrainer(model=model, ref_model=reference, reward_funcs=[reward([])], args=args,
                                      train_dataset=Dataset.from_dict({"prompt": _prompts()}),
                                      processing_class=tokenizer(), callbacks=[_keep_gradients(grads)])
    trainer._generate = _sampled.__get__(trainer)
    return trainer


def _plant_unwrapped(trainer, method, patch):
    """`method`, the trainer's step into the fused loss, gets the unwrapped policy."""
    original = getattr(type(trainer), method)
    patch.setattr(type(trainer), method, lambda self, model, *args, **kwargs: original(
        self, self.accelerator.unwrap_model(model), *args, **kwargs))


def _trainer_worker(rank, port, tmp_path, build, method):
    _torchrun_environment(rank, port)
    try:
        results = {}
        for case, planted in TRL_CASES.items():
            grads = {}
            trainer = build(tmp_path / case, PAIRS // RANKS, grads)
            assert trainer.accelerator.num_processes == RANKS
            with pytest.MonkeyPatch.context() as patch:
                if planted:
                    _plant_unwrapped(trainer, method, patch)
                trainer.train()
            assert isinstance(trainer.model_wrapped, DistributedDataParallel)
            results[case] = grads
        torch.save(results, tmp_path / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("build,method,terms", [(_dpo_trainer, "compute_loss", DPO_TOKENS),
                                                (_online_trainer, "_forward", ONLINE_TOKENS)],
                         ids=["PrefopsDPOTrainer", "PrefopsOnlineDPOTrainer"])
def test_trl_trainer_under_ddp_equals_one_process(tmp_path, build, method, terms):
    pytest.importorskip("trl")
    torch.multiprocessing.spawn(_trainer_worker, args=(_free_port(), tmp_path, build, method), nprocs=RANKS,
                                join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(RANKS)]
    single = {}
    build(tmp_path / "single", PAIRS, single).train()
    assert "lm_head.weight" in single
    for case, planted in TRL_CASES.items():
        _assert_cases(ranks, single, case, planted, terms)


# ----------------------------------------------------------------------------- the prefops trainer

TRAINER_CASES = {"ddp": False, "planted_unwrapped": True}


def _prefops_trainer_worker(rank, port, tmp_path):
    from prefops.training import loop as L
    from test_training_distributed import ACCUM, MICRO, _config, _step_zero

    _torchrun_environment(rank, port)
    try:
        results = {}
        for case, planted in TRAINER_CASES.items():
            trainer = L.Trainer(_config(tmp_path, "lm_head", micro_batch_size=MICRO, grad_accum_steps=ACCUM,
                                        data_parallel="ddp", out_dir=str(tmp_path / case)))
            assert isinstance(trainer.lm, DistributedDataParallel)
            if planted:
                trainer.lm = trainer.lm.module
            results[case] = _step_zero(trainer)
        torch.save(results, tmp_path / f"rank{rank}.pt")
        # The whole job runs too: SFT, the frozen reference (whole on each rank), eval, checkpoints, resume.
        job = dict(micro_batch_size=MICRO, grad_accum_steps=ACCUM, sft_steps=1, steps=2, data_parallel="ddp",
                   out_dir=str(tmp_path / "job"), reference="model", checkpoint_every=1)
        assert (L.Trainer(_config(tmp_path, "lm_head", **job)).train() != {}) == (rank == 0)
        L.Trainer(_config(tmp_path, "lm_head", **job, resume=True)).train()  # loads the finished run's state
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_prefops_trainer_under_ddp_equals_one_process(tmp_path):
    import json

    from prefops.training import loop as L
    from test_training_distributed import ACCUM, MICRO, TOKENS_PER_STEP, _config, _step_zero

    torch.multiprocessing.spawn(_prefops_trainer_worker, args=(_free_port(), tmp_path), nprocs=RANKS, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(RANKS)]
    record, single = _step_zero(L.Trainer(_config(tmp_path, "lm_head", micro_batch_size=MICRO * ACCUM * RANKS,
                                                  out_dir=str(tmp_path / "single"))))
    assert "lm_head.weight" in single
    grads = [{case: result[1] for case, result in each.items()} for each in ranks]
    for case, planted in TRAINER_CASES.items():
        # Loss records are all-reduced sums in both cases: only the gradients tell the planted bug apart.
        for each in ranks:
            assert_records_close(each[case][0], record, TOKENS_PER_STEP)
        _assert_cases(grads, single, case, planted, TOKENS_PER_STEP, divisor=1)
    log = [json.loads(line) for line in open(tmp_path / "job" / "log.jsonl")]
    assert [r["step"] for r in log if r["stage"] == "dpo" and r["kind"] == "train"] == [1, 2]
