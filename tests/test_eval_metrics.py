"""What evaluation adds to a pairwise objective's record (PreferenceObjective.eval_metrics): the ranking accuracy,
the idealised ranking accuracy of the optimal policy, and the chosen completions' likelihood diagnostics, each
against float64 computed here from the models' hidden states; and nothing of it in a training step.
"""
import json

import pytest
import torch

from conftest import assert_fp32_close
from helpers import nudge
from prefops.training import data as D, loop as L, model as M, run as R
from test_training import make_config
from test_training_row_fields import LAYOUTS, PROBS, write_jsonl

# Chosen and rejected of equal lengths, so that their log-probs are close and the policy, moved off the reference,
# ranks some pairs otherwise than the reference does.
PAIRS = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i % 10) * (1 + i % 3),
          "rejected": str((2 * i + 3) % 10) * (1 + i % 3)} for i in range(8)]
BETA = 5.0  # logit(p) / beta of the size of those log-prob differences, so the idealised ranking is not all right
SOFTCAP = 3.0  # read by LMHead.of, as Gemma-2 sets it: a metric that skipped the head's transform would differ
TOP_K = 10
EVAL_KEYS = {"logps/accuracies", "diagnostics/entropy", "diagnostics/top_k_entropy", "diagnostics/top_k_mass"}


def trainer_on(tmp_path, rows, **overrides):
    """A trainer on `rows` (on the CPU, in fp32) and its reference's weights; the policy is then moved off the
    reference."""
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    trainer = L.Trainer(make_config(tmp_path, data=path, eval_fraction=0.0, sft_steps=0, device="cpu", **overrides))
    trainer.model.config.final_logit_softcapping = SOFTCAP
    trainer.prepare("dpo")
    reference = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    nudge(trainer.model)
    return trainer, reference


@torch.no_grad()
def float64_diagnostics(model, batch):
    """Per sequence [S]: summed log p(target), and the means over its tokens of the entropy, the top-k entropy
    (of the top k renormalised) and the top-k mass, from float64 logits of the model's hidden states."""
    hidden = M.hidden_states(model, batch).double()
    weight = model.get_output_embeddings().weight.double()
    logits = SOFTCAP * torch.tanh(hidden @ weight.T / SOFTCAP)
    logp = logits.log_softmax(-1)
    counted = batch.targets != D.IGNORE_INDEX
    target_logp = logp.gather(-1, batch.targets.clamp_min(0)[..., None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1)
    top = logp.topk(TOP_K, dim=-1).values
    mass = top.exp().sum(-1)
    q = top.exp() / mass[..., None]
    top_entropy = -(q * q.log()).sum(-1)
    per_token = lambda value: (value * counted).sum(-1) / counted.sum(-1)  # noqa: E731
    return (target_logp * counted).sum(-1), {"entropy": per_token(entropy), "top_k_entropy": per_token(top_entropy),
                                             "top_k_mass": per_token(mass)}


def expected_metrics(trainer, reference, probs):
    """Each pair's eval metrics in float64, with preference probabilities `probs` [P] (or None)."""
    config, dataset = trainer.config, trainer.stages["dpo"].train_set
    batch = D.collate(dataset, list(range(len(dataset))), packing=False)
    pairs = len(dataset)
    logps, diagnostics = float64_diagnostics(trainer.model, batch)
    chosen, rejected = logps[:pairs], logps[pairs:]
    assert (chosen - rejected).abs().min() > 1e-3  # no near tie: the indicator is the same in fp32
    expected = {"logps/accuracies": (chosen > rejected).double(),
                **{f"diagnostics/{name}": value[:pairs] for name, value in diagnostics.items()}}
    if probs is not None:
        model, _ = M.build(config, torch.device("cpu"), trainer.task and trainer.task.alphabet)
        model.load_state_dict(reference)
        model.config.final_logit_softcapping = SOFTCAP
        ref_logps = float64_diagnostics(model, batch)[0]
        log_odds = torch.log(probs / (1 - probs)) / config.beta
        optimum = ref_logps[:pairs] - ref_logps[pairs:] + log_odds
        assert optimum.abs().min() > 1e-3
        expected["logps/idealised_accuracies"] = (optimum > 0).double()
        # The data tells the reference's log-probs from the policy's.
        assert (expected["logps/idealised_accuracies"] != (chosen - rejected + log_odds > 0).double()).any()
    return expected


def evaluate(trainer, parts):
    """The objective's record of micro-batches of the pairs `parts` as evaluation computes it (without gradients)."""
    config, dataset = trainer.config, trainer.stages["dpo"].train_set
    batches = [D.collate(dataset, part, packing=config.packing, shared_prompt=config.shared_prompt) for part in parts]
    with torch.no_grad():
        return L.run_batches(trainer.lm, trainer.stages["dpo"].objective, batches, trainer.autocast, backward=False)


def check_eval_metrics(trainer, reference, probs) -> dict:
    """The record of all pairs, in micro-batches of 5 and 3 (so that a mean of micro-batch means would differ from
    the mean over pairs), against float64; then each pair's ranking indicators, one pair at a time."""
    expected = expected_metrics(trainer, reference, probs)
    indices = list(range(len(PAIRS)))
    record = evaluate(trainer, [indices[:5], indices[5:]])
    terms = 2 * len(PAIRS) * 16 + trainer.model.config.vocab_size
    assert set(expected) <= set(record)
    for name, values in expected.items():
        assert_fp32_close(torch.tensor(record[name], dtype=torch.float64), values.mean(), terms, name)
    rankings = [name for name in ("logps/accuracies", "logps/idealised_accuracies") if name in expected]
    for i in indices:
        single = evaluate(trainer, [[i]])
        assert {name: single[name] for name in rankings} == {name: float(expected[name][i]) for name in rankings}, i
    return record


@pytest.mark.parametrize("impl, layout", [("fused", layout) for layout in LAYOUTS] + [("reference", "padded")])
def test_eval_metrics_with_soft_labels(tmp_path, impl, layout):
    rows = [{**pair, "preference_prob": p} for pair, p in zip(PAIRS, PROBS)]
    trainer, reference = trainer_on(tmp_path, rows, beta=BETA, loss_impl=impl, **LAYOUTS[layout])
    dataset = trainer.stages["dpo"].train_set
    probs = torch.tensor([example.preference_prob for example in dataset.examples], dtype=torch.float64)
    check_eval_metrics(trainer, reference, probs)
    # A training step computes none of it.
    batch = D.collate(dataset, list(range(len(dataset))), packing=trainer.config.packing,
                      shared_prompt=trainer.config.shared_prompt)
    step = L.run_batches(trainer.lm, trainer.stages["dpo"].objective, [batch], trainer.autocast, backward=True)
    assert not (EVAL_KEYS | {"logps/idealised_accuracies"}) & set(step)


@pytest.mark.parametrize("overrides, idealised", [
    ({"label_smoothing": 0.2}, True),     # every pair's p = 1 - label_smoothing
    ({"loss_type": "tdpo1", "label_smoothing": 0.2}, True),  # the reference's log-probs from its distributions
    ({}, False),                          # hard labels: p = 1 ranks every pair right
    ({"ld_alpha": 0.5, "label_smoothing": 0.2}, False),  # length-weighted reference sums
    ({"loss_type": "simpo"}, False),      # no reference
])
def test_eval_metrics_without_soft_labels(tmp_path, overrides, idealised):
    trainer, reference = trainer_on(tmp_path, PAIRS, beta=BETA, **overrides)
    smoothing = overrides.get("label_smoothing", 0.0)
    probs = torch.full((len(PAIRS),), 1 - smoothing, dtype=torch.float64) if idealised else None
    record = check_eval_metrics(trainer, reference, probs)
    assert ("logps/idealised_accuracies" in record) == idealised


def test_eval_records_carry_them(tmp_path):
    config = make_config(tmp_path, sft_steps=0, steps=2, eval_every=1, eval_batches=1, win_rate_samples=4)
    R.train(config)
    records = [json.loads(line) for line in open(f"{config.out_dir}/log.jsonl")]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 3 and all(EVAL_KEYS <= set(r) for r in evals)
    assert all(0 <= r["logps/accuracies"] <= 1 and 0 < r["diagnostics/top_k_mass"] <= 1 for r in evals)
    assert not any(EVAL_KEYS & set(r) for r in records if r["kind"] == "train")
