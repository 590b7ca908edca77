"""DeepSpeed ZeRO-3: the fused ops read the lm_head weight inside the output embedding's own call
(prefops.integrations.hf.head_call), where ZeRO-3 has it gathered, and its gradient reaches ZeRO-3's
reduce-scatter through that call's backward.

A stand-in that partitions the lm_head weight as ZeRO-3 does (an empty tensor outside its module's
forward and backward; the full one gathered by hooks for them) always runs: preference_loss (policy with
grad, reference forward-only) and the online trainer's fused _forward must give the gradients of the plain
model, and reading the weight outside the call (the planted bug) must fail. DeepSpeed itself (not a
dependency of prefops; `pip install deepspeed` runs ZeRO-3 on CPU with gloo, compiling a small
communication op on first use) runs preference_loss on a ZeRO-3 engine, and PrefopsDPOTrainer and
PrefopsOnlineDPOTrainer as accelerate launches them with a ZeRO-3 config, each on 2 processes against one
plain process; those tests are skipped when deepspeed is not installed. With head_call bypassed they fail
on the empty weight.
"""
import os
import types

import pytest
import torch
import torch.distributed as dist
import transformers

import prefops.integrations.hf as hf
from conftest import assert_fp32_close
from test_hf_integration import LENGTH, padded_batch, tiny
from test_training_distributed import _free_port

PAIRS = 4
TOKENS = PAIRS * 2 * LENGTH


def _model(seed=0):
    return tiny(transformers.LlamaConfig, transformers.LlamaForCausalLM, tie_word_embeddings=False, seed=seed)


class StandInZero3:
    """ZeRO-3's view of one module's parameters, on one process: each is an empty tensor (ds_shape records
    its shape) except while the module's forward runs and while backward runs through the module's outputs;
    gradients go to `handed`, as ZeRO-3 hands them to its reduce-scatter, and leave .grad empty."""

    def __init__(self, module):
        self.params = list(module.parameters(recurse=False))
        self.full = {id(p): p.data for p in self.params}
        self.handed = {}
        for number, param in enumerate(self.params):
            param.ds_id, param.ds_shape = number, param.shape
            param.register_post_accumulate_grad_hook(self.hand_over)
        self.release()
        module.register_forward_pre_hook(lambda *_: self.gather())
        module.register_forward_hook(self.after_forward)

    def gather(self):
        for param in self.params:
            param.data = self.full[id(param)]

    def release(self):
        for param in self.params:
            param.data = torch.empty(0, dtype=param.dtype)

    def after_forward(self, module, args, output):
        self.release()
        # Backward gathers again where it reaches the call's outputs (ZeRO-3's PreBackwardFunction).
        tensors = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.grad_fn]
        for tensor in tensors:
            tensor.register_hook(lambda grad: (self.gather(), grad)[1])

    def hand_over(self, param):
        self.handed[param.ds_id] = self.handed.get(param.ds_id, 0) + param.grad
        param.grad = None
        self.release()


def _online_logps(model, batch):
    """PrefopsOnlineDPOTrainer's fused _forward on the batch's rows as (prompt of 4 tokens, completion)."""
    pytest.importorskip("trl")
    from prefops.integrations.trl import _FusedOnlineLogprobs
    ids, mask = batch["input_ids"], batch["attention_mask"]
    trainer = types.SimpleNamespace(max_length=64)
    logps = _FusedOnlineLogprobs._forward(trainer, model, ids[:, :4], mask[:, :4], ids[:, 4:], mask[:, 4:])
    return (logps * mask[:, 4:]).sum() / mask.sum()


def _losses(model, reference, batch):
    """The fused paths that read the lm_head weight: preference_loss with a reference model (fused_loss with
    grad, completion_logps forward-only) and the online trainer's _forward."""
    unscored = {key: value for key, value in batch.items() if not key.startswith("ref_")}
    return {"preference_loss": lambda: hf.preference_loss(model, unscored, ref_model=reference)[0],
            "online _forward": lambda: _online_logps(model, batch)}


@pytest.mark.parametrize("planted", [False, True], ids=["head_call", "planted_read_outside"])
def test_a_zero3_partitioned_head_gives_the_plain_gradients(planted, monkeypatch):
    batch = padded_batch(0, pairs=PAIRS)
    for name in ("preference_loss", "online _forward"):
        plain, plain_reference = _model(), _model(seed=1)
        _losses(plain, plain_reference, batch)[name]().backward()
        model, reference = _model(), _model(seed=1)
        zero3 = [StandInZero3(m.get_output_embeddings()) for m in (model, reference)]
        if planted:  # the fused op reads the weight where ZeRO-3 has it partitioned
            monkeypatch.setattr(hf, "head_call", lambda model, hidden, fn, head=None: fn(
                hidden, hf.LMHead.of(model) if head is None else head))
            import prefops.integrations.trl as trl
            monkeypatch.setattr(trl, "head_call", hf.head_call)
            with pytest.raises((ValueError, RuntimeError), match="weight must have shape|size mismatch"):
                _losses(model, reference, batch)[name]().backward()
            monkeypatch.undo()
            continue
        _losses(model, reference, batch)[name]().backward()
        assert zero3[1].handed == {}, name  # the reference ran forward-only
        assert_fp32_close(zero3[0].handed[0], plain.lm_head.weight.grad, TOKENS, f"{name}: lm_head.weight")
        for (key, param), expected in zip(model.model.named_parameters(), plain.model.parameters()):
            assert_fp32_close(param.grad, expected.grad, TOKENS, f"{name}: {key}")


# ----------------------------------------------------------------------------- DeepSpeed itself

RANKS = 2
# Persistence threshold 0: even this tiny model's parameters are partitioned, none kept whole.
ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "zero_allow_untested_optimizer": True,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def _deepspeed_worker(rank, port, out):
    import deepspeed
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(RANKS), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        config = {**ZERO3, "train_micro_batch_size_per_gpu": PAIRS // RANKS, "gradient_accumulation_steps": 1,
                  "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}
        model = _model()
        engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
        assert hasattr(engine.module.lm_head.weight, "ds_id") and engine.module.lm_head.weight.numel() == 0
        share = torch.arange(rank * PAIRS // RANKS, (rank + 1) * PAIRS // RANKS)
        rows = torch.cat([share, share + PAIRS])
        batch = {key: value[share if key.startswith("ref_") else rows] for key, value in
                 padded_batch(0, pairs=PAIRS).items()}
        loss, _ = hf.preference_loss(engine, batch, check=False)
        engine.backward(loss)
        from deepspeed.utils import safe_get_full_grad
        grads = {name: safe_get_full_grad(param).clone() for name, param in engine.module.named_parameters()}
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_deepspeed_zero3_on_two_processes_equals_one(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "grads.pt"
    torch.multiprocessing.spawn(_deepspeed_worker, args=(_free_port(), str(out)), nprocs=RANKS, join=True)
    zero3 = torch.load(out)
    plain = _model()
    hf.preference_loss(plain, padded_batch(0, pairs=PAIRS), check=False)[0].backward()
    for name, param in plain.named_parameters():
        assert param.grad.abs().max() > 0, name
        # ZeRO averages the ranks' gradients of their mean losses: the mean over all pairs.
        assert_fp32_close(zero3[name], param.grad, TOKENS, name)


# The trainers as `accelerate launch` with a ZeRO-3 DeepSpeed config starts them: accelerate runs DEEPSPEED
# on gloo and TRL's loop hands the fused paths the DeepSpeedEngine.


def _full_gradients(grads):
    """A callback that gathers every parameter's whole gradient (ZeRO-3 holds 1/world of it per rank)."""
    from deepspeed.utils import safe_get_full_grad

    class FullGradients(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({name: safe_get_full_grad(p).clone() for name, p in model.named_parameters()})
    return FullGradients()


def _trainer_worker(rank, port, tmp_path, build_name):
    import functools

    import test_ddp
    import test_trl_integration
    import trl.experimental.online_dpo as online_dpo
    os.environ.update(DS_ACCELERATOR="cpu", ACCELERATE_USE_DEEPSPEED="true")
    test_ddp._torchrun_environment(rank, port)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_trl_integration, "config", functools.partial(test_trl_integration.config, deepspeed=ZERO3))
        patch.setattr(online_dpo, "OnlineDPOConfig", functools.partial(online_dpo.OnlineDPOConfig, deepspeed=ZERO3))
        patch.setattr(test_ddp, "_keep_gradients", _full_gradients)
        try:
            grads = {}
            trainer = getattr(test_ddp, build_name)(tmp_path / "zero3", PAIRS // RANKS, grads)
            assert trainer.accelerator.distributed_type == "DEEPSPEED"
            trainer.train()
            assert hasattr(trainer.model.lm_head.weight, "ds_id") and trainer.model.lm_head.weight.numel() == 0
            torch.save(grads, tmp_path / f"rank{rank}.pt")
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("build_name,tokens", [("_dpo_trainer", "DPO_TOKENS"), ("_online_trainer", "ONLINE_TOKENS")],
                         ids=["PrefopsDPOTrainer", "PrefopsOnlineDPOTrainer"])
def test_trl_trainers_under_deepspeed_zero3_equal_one_process(tmp_path, build_name, tokens):
    pytest.importorskip("deepspeed")
    pytest.importorskip("trl")
    import test_ddp
    torch.multiprocessing.spawn(_trainer_worker, args=(_free_port(), tmp_path, build_name), nprocs=RANKS, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(RANKS)]
    single = {}
    getattr(test_ddp, build_name)(tmp_path / "single", PAIRS, single).train()
    test_ddp._assert_ranks_match_one_process(ranks, single, getattr(test_ddp, tokens))
