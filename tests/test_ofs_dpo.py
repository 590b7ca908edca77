"""OFS-DPO (training/ofs.py): a fast and a slow LoRA adapter over the frozen model.

Their losses, the regulariser between them and its gradient against float64 of the same
parameters; what trains at which rate; the swap; runs from config, offline (with SFT and
resume) and online. A 1-layer Llama of width 32 on the bundled tasks.
"""
import contextlib
import copy
import json
import math

import pytest
import torch

from conftest import lm_tolerances, relative_error
from helpers import interrupted_then_resumed
from prefops.training import adapters, config as C, data as D, loop as L, model as M, objectives as O, ofs, references
from prefops.training import run as R
from prefops.training.synthetic import TASKS
from test_training import NO_AUTOCAST, dataclass_replace, make_config, train_records

pytest.importorskip("peft")

OFS = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"], "lr_ratio": 4.0, "reg_weight": 0.7}
CPU = torch.device("cpu")


def adapters_away_from_zero(model, scale=0.3, seed=1):
    """Both adapters at random weights, apart from each other and from the reference (B = 0 makes them the model)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in adapters.ADAPTERS:
            for parameter in adapters.adapter_parameters(model, name):
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


@pytest.fixture
def model_and_batch(tmp_path):
    config = make_config(tmp_path, sft_steps=0, beta=0.5, ofs_dpo=OFS)
    model, tokenizer = M.build(config, CPU, "0123456789+=")
    with torch.no_grad():  # logits of a few units, as a trained model's, so the adapters move the log-probs
        model.get_output_embeddings().weight.mul_(20.0)
    adapters_away_from_zero(model)
    records = [D.Record(f"row{i}", f"{i}+{i}=", [str(2 * i) * (1 + i % 3), str(i) * (1 + (i + 1) % 4)])
               for i in range(6)]
    dataset = D.build_dataset(records, tokenizer, 16, [])
    return config, model, D.collate(dataset, list(range(6)), packing=False)


def sequence_logps64(model64, batch, adapter):
    """Summed completion log-probs [2P] of the float64 model with `adapter` (None: adapters off), from its
    own materialised logits, and the RMS of those logits over the completion tokens."""
    if adapter is not None:
        model64.set_adapter(adapter)
    with model64.disable_adapter() if adapter is None else contextlib.nullcontext():
        logits = model64(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    counted = batch.targets != D.IGNORE_INDEX
    logp = torch.log_softmax(logits, -1).gather(-1, batch.targets.clamp_min(0)[..., None]).squeeze(-1)
    return (logp * counted).sum(1), logits[counted].detach().pow(2).mean().sqrt().item()


def expected64(model, batch, beta, reg_weight):
    """Float64 of the same parameters, from the definitions: each adapter's DPO loss against the model with the
    adapters off, the regulariser -log sigmoid(beta (h_fast - h_slow)) (means over pairs), and the gradients
    of fast_loss + reg_weight * regulariser (slow's log-probs held fixed) and of slow_loss, per adapter."""
    model64 = copy.deepcopy(model).double()
    pairs = batch.num_examples
    softplus = torch.nn.functional.softplus
    with torch.no_grad():
        ref, _ = sequence_logps64(model64, batch, None)
    margin = lambda logps: (logps[:pairs] - ref[:pairs]) - (logps[pairs:] - ref[pairs:])  # noqa: E731
    values, grads = {}, {}
    slow, logit_rms = sequence_logps64(model64, batch, "slow")
    values["slow_loss"] = softplus(-beta * margin(slow)).mean()
    grads["slow"] = torch.autograd.grad(values["slow_loss"], adapters.adapter_parameters(model64, "slow"))
    fast, _ = sequence_logps64(model64, batch, "fast")
    values["fast_loss"] = softplus(-beta * margin(fast)).mean()
    values["regulariser"] = softplus(-beta * (margin(fast) - margin(slow.detach()))).mean()
    grads["fast"] = torch.autograd.grad(values["fast_loss"] + reg_weight * values["regulariser"],
                                        adapters.adapter_parameters(model64, "fast"))
    lengths = (batch.targets != D.IGNORE_INDEX).sum(1).double()
    return {k: v.detach() for k, v in values.items()}, grads, lengths, logit_rms


def test_losses_regulariser_and_gradients_match_float64(model_and_batch):
    config, model, batch = model_and_batch
    reference = references.frozen_model(ofs.BaseLM(model), config.loss_impl, NO_AUTOCAST)
    objective = ofs.FastSlowObjective(O.PreferenceObjective(config, reference), config, model)
    record = L.run_batches(M.FusedLM(model), objective, [batch], NO_AUTOCAST, backward=True)
    reg_weight = OFS["reg_weight"]
    want, want_grads, lengths, logit_rms = expected64(model, batch, config.beta, reg_weight)

    values, gradients = lm_tolerances(model.config, batch.input_ids.shape[1], int(lengths.sum()), logit_rms)
    # Each loss moves by at most beta times the error of its margins: four log-prob sums of a pair.
    scale = torch.tensor(config.beta * 4 * lengths.mean().item() * logit_rms)
    for name in ("fast_loss", "slow_loss", "regulariser"):
        assert relative_error(torch.tensor(record[f"ofs/{name}"]), want[name], scale=scale) <= values, name
    total = want["fast_loss"] + want["slow_loss"] + reg_weight * want["regulariser"]
    assert relative_error(torch.tensor(record["loss"]), total, scale=scale) <= values
    # The regulariser is not a copy of either loss: the adapters are apart.
    assert abs(want["regulariser"] - want["fast_loss"]) > 1e3 * values * scale
    for name in adapters.ADAPTERS:
        actual = torch.cat([p.grad.reshape(-1) for p in adapters.adapter_parameters(model, name)])
        assert relative_error(actual, torch.cat([g.reshape(-1) for g in want_grads[name]])) <= gradients, name
    adapter_ids = {id(p) for name in adapters.ADAPTERS for p in adapters.adapter_parameters(model, name)}
    assert all(p.grad is None for p in model.parameters() if id(p) not in adapter_ids)
    assert model.active_adapter == "fast"  # the policy between steps


def test_gradient_checkpointing_gives_the_same_gradients(model_and_batch):
    """A layer recomputed in backward runs with the adapter that ran it (the slow pass is differentiated
    before the fast one runs)."""
    config, model, batch = model_and_batch
    grads = {}
    for checkpointing in (False, True):
        built = M.build(dataclass_replace(config, gradient_checkpointing=checkpointing), CPU, "0123456789+=")[0]
        built.load_state_dict(model.state_dict())
        reference = references.frozen_model(ofs.BaseLM(built), config.loss_impl, NO_AUTOCAST)
        objective = ofs.FastSlowObjective(O.PreferenceObjective(config, reference), config, built)
        L.run_batches(M.FusedLM(built.train()), objective, [batch], NO_AUTOCAST, backward=True)
        grads[checkpointing] = {name: torch.cat([p.grad.reshape(-1) for p in adapters.adapter_parameters(built, name)])
                                for name in adapters.ADAPTERS}
    for name in adapters.ADAPTERS:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-6, atol=1e-9, msg=name)


def trainer_at_constant_lr(tmp_path, **ofs_options):
    config = make_config(tmp_path, sft_steps=0, steps=8, lr=1e-2, warmup_steps=0, lr_schedule="constant",
                         eval_every=100, ofs_dpo={**OFS, **ofs_options})
    trainer = L.Trainer(config)
    trainer.prepare("dpo")
    return trainer, config


def test_only_the_adapters_train_each_at_its_rate(tmp_path):
    trainer, config = trainer_at_constant_lr(tmp_path, swap=False)
    stage = trainer.stages["dpo"]
    optimizer, scheduler = trainer.optimizer(config.lr, config.steps)
    fast, slow = (adapters.adapter_parameters(trainer.model, name) for name in adapters.ADAPTERS)
    assert [group["lr"] for group in optimizer.param_groups[:2]] == [config.lr, config.lr / OFS["lr_ratio"]]
    assert optimizer.param_groups[0]["params"] == fast and optimizer.param_groups[1]["params"] == slow
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train_step("dpo", 0, stage.train_set, stage.objective, optimizer, scheduler)
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in trainer.model.named_parameters()}
    adapter_names = {name for name, p in trainer.model.named_parameters()
                     if any(p is q for q in fast + slow)}
    assert all(moved[name] == 0 for name in moved if name not in adapter_names)  # the model itself is frozen
    # AdamW's first step moves a parameter by lr * g / (|g| + eps): its lr wherever the gradient is not tiny.
    for name, lr in (("fast", config.lr), ("slow", config.lr / OFS["lr_ratio"])):
        step = max(moved[n] for n in adapter_names if f".{name}." in n)
        assert step == pytest.approx(lr, rel=1e-4), name


def adapter_state(model, optimizer, name):
    return [(p.detach().clone(), optimizer.state[p]["exp_avg"].clone())
            for p in adapters.adapter_parameters(model, name)]


def test_the_adapter_ahead_becomes_the_fast_one_after_the_step(tmp_path):
    trainer, config = trainer_at_constant_lr(tmp_path, swap=False)
    stage = trainer.stages["dpo"]
    optimizer, scheduler = trainer.optimizer(config.lr, config.steps)
    for step in range(3):
        record = trainer.train_step("dpo", step, stage.train_set, stage.objective, optimizer, scheduler)
    # The faster adapter is ahead; exchanged, the slow one is, and the next step's losses call for a swap.
    adapters.swap_adapters(trainer.model, optimizer)
    model_state, optimizer_state = copy.deepcopy(trainer.model.state_dict()), copy.deepcopy(optimizer.state_dict())
    kept = {}
    for swap in (False, True):
        trainer.model.load_state_dict(model_state)
        optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        stage.objective.swap = swap
        record = trainer.train_step("dpo", 3, stage.train_set, stage.objective, optimizer, scheduler)
        kept[swap] = {name: adapter_state(trainer.model, optimizer, name) for name in adapters.ADAPTERS}
    assert record["ofs/slow_loss"] < record["ofs/fast_loss"] and record["ofs/swaps"] == 1
    # The same step was taken (each adapter at its rate), then the adapters exchanged weights and moments.
    for name, other in (("fast", "slow"), ("slow", "fast")):
        for (weight, moment), (weight_swapped, moment_swapped) in zip(kept[False][name], kept[True][other]):
            assert torch.equal(weight, weight_swapped) and torch.equal(moment, moment_swapped)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(kept[False]["fast"], kept[False]["slow"]))


def test_run_from_config_with_sft_logs_the_metrics(tmp_path):
    """SFT trains the model's own weights (the adapters stay zero), then only the adapters train."""
    config = make_config(tmp_path, ofs_dpo=OFS, steps=4)
    R.train(config)
    records = [r for r in train_records(config.out_dir) if r["stage"] == "dpo"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        for key in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "ofs/fast_loss",
                    "ofs/slow_loss", "ofs/regulariser", "ofs/reward_gap", "ofs/slow_margin", "ofs/slow_accuracy"):
            assert math.isfinite(record[key]), key
        total = record["ofs/fast_loss"] + record["ofs/slow_loss"] + OFS["reg_weight"] * record["ofs/regulariser"]
        assert record["loss"] == pytest.approx(total, rel=1e-6)
        assert record["ofs/swaps"] in range(record["step"] + 1)
    evals = [json.loads(line) for line in open(f"{config.out_dir}/log.jsonl")]
    assert any(r["kind"] == "eval" and r["stage"] == "dpo" and "ofs/regulariser" in r for r in evals)
    start = torch.load(f"{config.out_dir}/sft.pt", weights_only=False)["model"]
    end = torch.load(f"{config.out_dir}/last.pt", weights_only=False)["model"]
    fresh = M.build(config, CPU, TASKS["addition"].alphabet)[0].state_dict()
    lora = [name for name in start if "lora_" in name]
    assert lora and all(not start[name].abs().sum() for name in lora if "lora_B" in name)
    assert any(not torch.equal(start[name], fresh[name]) for name in start if "lora_" not in name)
    assert all(torch.equal(start[name], end[name]) for name in start if "lora_" not in name)
    assert all(end[name].abs().sum() > 0 for name in lora if "lora_B" in name)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    values = dict(sft_steps=0, steps=6, lr=1e-2, warmup_steps=0, ofs_dpo=OFS)
    straight = make_config(tmp_path, out_dir=str(tmp_path / "straight"), **values)
    straight_trainer = L.Trainer(straight)
    straight_trainer.train()
    assert train_records(straight.out_dir)[-1]["ofs/swaps"] > 0  # the swap count is restored too

    config = make_config(tmp_path, out_dir=str(tmp_path / "resumed"), **values)
    resumed_trainer = interrupted_then_resumed(L.Trainer, config, step=4)
    assert train_records(config.out_dir) == train_records(straight.out_dir)
    for name, tensor in straight_trainer.model.state_dict().items():
        assert torch.equal(resumed_trainer.model.state_dict()[name], tensor), name


def test_online_rounds_sample_from_the_fast_adapter(tmp_path, monkeypatch):
    from test_online import make_config as online_config
    from test_online import records

    from prefops.training import sampling
    config = online_config(tmp_path, ofs_dpo=OFS, online={"rounds": 2})
    sampled, sample = [], sampling.sample

    def recording(model, *args, **kwargs):
        sampled.append(model.active_adapter)
        return sample(model, *args, **kwargs)
    monkeypatch.setattr(sampling, "sample", recording)
    R.train(config)
    assert sampled and set(sampled) == {"fast"}
    rounds = [r for r in records(config.out_dir, "eval") if "round" in r]
    assert len(rounds) == 2 and all(math.isfinite(r["ofs/regulariser"]) for r in rounds)
    assert all(math.isfinite(r["ofs/regulariser"]) for r in records(config.out_dir, "train") if r["stage"] == "dpo")


@pytest.mark.parametrize("change, message", [
    ({"ofs_dpo": {"rnak": 4}}, "ofs_dpo.rnak is not an ofs_dpo key; valid: rank, alpha"),
    ({"ofs_dpo": {"rank": 0}}, "ofs_dpo.rank must be a positive integer; got 0"),
    ({"ofs_dpo": {"lr_ratio": 1}}, r"ofs_dpo.lr_ratio must be a number > 1 \(the fast adapter learns faster\)"),
    ({"ofs_dpo": {"reg_weight": -1}}, "ofs_dpo.reg_weight must be a number >= 0"),
    ({"ofs_dpo": {"swap": "yes"}}, "ofs_dpo.swap must be true or false"),
    ({"ofs_dpo": {"target_modules": []}}, "ofs_dpo.target_modules must be a list of module names, all-linear or null"),
    ({"ofs_dpo": {"rank": 4}, "loss_type": "kto"}, "ofs_dpo trains each adapter on a pairwise loss; loss_type 'kto'"),
    ({"ofs_dpo": {"rank": 4}, "reference_update": "stage", "curriculum": "rank"}, "set reference_update: never"),
])
def test_bad_options_are_refused(tmp_path, change, message):
    with pytest.raises(C.ConfigError, match=message):
        make_config(tmp_path, **change)


def test_target_modules_that_match_nothing_are_refused(tmp_path):
    config = make_config(tmp_path, ofs_dpo={"target_modules": ["no_such_proj"]})
    with pytest.raises(C.ConfigError, match="ofs_dpo.target_modules"):
        M.build(config, CPU)
