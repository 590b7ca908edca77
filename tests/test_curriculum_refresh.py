"""Curry-DPO's reference refresh (reference_update: stage): the reference of each curriculum stage is the policy
at its first step, for the frozen model and the precomputed table, and a run resumed mid-stage keeps it.

A 1-layer Llama of width 32 on ranked sums of three candidates: curriculum rank gives two stages (the best
answer against the worst, then against the middle one) of 15 pairs each, so with 4 pairs a step the second
stage starts at step 4 and the next epoch's first stage at step 8.
"""
import json

import pytest
import torch

from helpers import interrupted_then_resumed
from prefops.training import config as C, data as D, loop as L, model as M, references
from test_training import make_config, train_records

CURRICULUM = dict(synthetic_size=16, list_size=3, curriculum="rank", sft_steps=1, steps=10, micro_batch_size=4,
                  eval_every=5, eval_batches=1, win_rate_samples=4, checkpoint_every=1, reference_update="stage",
                  device="cpu")  # the probe batches stay on the CPU


def curriculum_config(tmp_path, name, **overrides):
    return make_config(tmp_path, out_dir=str(tmp_path / name), **{**CURRICULUM, **overrides})


def stage_starts(train_set, steps, batch_size, seed):
    """The first step of each run of steps in one curriculum stage; a step is in the stage of its first example."""
    stages = [train_set.examples[D.step_indices(len(train_set), step, batch_size, seed, "dpo",
                                                train_set.curriculum)[0]].stage for step in range(steps)]
    return [step for step in range(steps) if step == 0 or stages[step] != stages[step - 1]]


def spy_on_steps(trainer):
    """Before each step: the policy's weights and both objectives' reference values on a probe batch of each set
    (its first micro-batch, which a precomputed table is also computed from)."""
    seen = []
    train_step = trainer.train_step

    def spy(stage, step, *args):
        if stage == "dpo":
            _, _, train_set, objective, eval_set, eval_objective = trainer.stages[stage]
            seen.append((step, {name: t.clone() for name, t in trainer.model.state_dict().items()},
                         [torch.stack(each.reference(probe(trainer, dataset)))
                          for each, dataset in ((objective, train_set), (eval_objective, eval_set))]))
        return train_step(stage, step, *args)
    trainer.train_step = spy
    return seen


def probe(trainer, dataset):
    return D.collate(dataset, list(range(min(len(dataset), trainer.config.micro_batch_size))),
                     packing=trainer.config.packing)


def reference_values(trainer, weights, dataset):
    """The reference values of the probe batch under a model holding `weights`, computed here from scratch."""
    model, _ = M.build(trainer.config, torch.device("cpu"), trainer.task.alphabet)
    model.load_state_dict(weights)
    compute = references.frozen_model(M.FusedLM(M.frozen_copy(model)), trainer.config.loss_impl, trainer.autocast)
    return torch.stack(compute(probe(trainer, dataset)))


@pytest.mark.parametrize("reference", ["model", "precomputed"])
@pytest.mark.parametrize("update", ["stage", "never"])
def test_reference_is_the_policy_at_each_stage_start(tmp_path, reference, update):
    config = curriculum_config(tmp_path, f"{reference}-{update}", reference=reference, reference_update=update)
    trainer = L.Trainer(config)
    seen = spy_on_steps(trainer)
    trainer.train()
    train_set, eval_set = trainer.stages["dpo"].train_set, trainer.stages["dpo"].eval_set
    starts = stage_starts(train_set, config.steps, config.batch_size, config.seed)
    assert starts == [0, 4, 8]  # the second stage, then the next epoch's first
    policy = {step: weights for step, weights, _ in seen}
    for step, _, values in seen:
        start = max(s for s in starts if s <= step) if update == "stage" else 0
        for value, dataset in zip(values, (train_set, eval_set)):
            assert torch.equal(value, reference_values(trainer, policy[start], dataset)), (step, start)
    # The policy moves, so a stale reference would differ from the one expected.
    assert torch.equal(seen[4][2][0], seen[0][2][0]) == (update == "never")


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_resume_mid_stage_reproduces_uninterrupted_run(tmp_path, reference):
    straight = curriculum_config(tmp_path, "straight", reference=reference)
    straight_trainer = L.Trainer(straight)
    straight_trainer.train()

    config = curriculum_config(tmp_path, "resumed", reference=reference)
    resumed_trainer = interrupted_then_resumed(L.Trainer, config, step=6)  # the middle of the second stage (4 to 7)

    assert train_records(config.out_dir) == train_records(straight.out_dir)
    evals = [[r for r in map(json.loads, open(f"{out}/log.jsonl")) if r["kind"] == "eval"]
             for out in (config.out_dir, straight.out_dir)]
    assert evals[0] == evals[1]
    for name, tensor in straight_trainer.model.state_dict().items():
        assert torch.equal(resumed_trainer.model.state_dict()[name], tensor), name
    # Evaluating the checkpoint freezes the stage's reference, not the SFT policy.
    assert L.evaluate(config)["loss"] == evals[1][-1]["loss"]


def test_reference_free_loss_refuses_stage_refresh(tmp_path):
    with pytest.raises(C.ConfigError, match="reference_update: stage refreshes the reference, which loss_type "
                                            "'simpo' with reference auto does not read"):
        curriculum_config(tmp_path, "simpo", loss_type="simpo", reference="auto")
