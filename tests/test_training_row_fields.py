"""Per-pair fields of pairwise rows (preference_prob, weight, margin): each bad value named by file:line,
every value carried to the loss in every batch layout, and a field no chosen loss reads refused."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_fp32_close
from helpers import nudge
from prefops.losses import LOSSES, pairwise_loss
from prefops.losses.pairwise import TOKEN_LEVEL_LOSSES
from prefops.training import data as D, loop as L, model as M, objectives as O, references, run as R
from prefops.training.tokenizer import CharTokenizer
from test_training import make_config

# Unequal completions; every field takes values away from its neutral one (p = 1, w = 1, m = 0) on most pairs.
PAIRS = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i) * (1 + i % 3), "rejected": str(i) * (1 + (i + 1) % 4)}
         for i in range(8)]
PROBS = [0.9, 0.6, 1.0, 0.0, 0.75, 0.3, 0.5, 0.85]
WEIGHTS = [1.0, 0.0, 2.0, 0.5, 1.5, 0.0, 3.0, 1.0]
MARGINS = [0.5, -1.0, 2.0, 0.0, -0.3, 1.2, 0.7, -2.0]


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def pairs_with(**fields):
    """PAIRS with each given field's values, one per row."""
    return [{**pair, **{name: values[i] for name, values in fields.items()}} for i, pair in enumerate(PAIRS)]


def load_records(path, **options):
    return D.records_for(D.read_rows(path, kind="preference", size=0, seed=0), "dpo", **options)[0]


@pytest.mark.parametrize("field, value", [
    ("preference_prob", "1.5"), ("preference_prob", "-0.01"), ("preference_prob", '"0.5"'),
    ("preference_prob", "true"), ("preference_prob", "NaN"),
    ("weight", "-1"), ("weight", "Infinity"), ("weight", "NaN"), ("weight", '"x"'),
    ("margin", "-Infinity"), ("margin", "[1]"),
])
def test_bad_value_is_reported_with_file_line_and_field(tmp_path, field, value):
    good = json.dumps({**PAIRS[0], field: 0.5})
    bad = json.dumps(PAIRS[1])[:-1] + f', "{field}": {value}}}'
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(D.DataError) as error:
        load_records(path)
    assert f"{path}:2: field '{field}': expected {D.PAIR_FIELDS[field]}" in str(error.value)


def test_valid_values_are_kept_on_records_and_sft_takes_the_chosen_completion_alone(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs_with(preference_prob=PROBS, weight=WEIGHTS, margin=MARGINS))
    records = load_records(path)
    assert [(r.preference_prob, r.weight, r.margin) for r in records] == list(zip(PROBS, WEIGHTS, MARGINS))
    # The fields describe the comparison, which SFT on the chosen completions does not make.
    sft = D.records_for(D.read_rows(path, kind="sft", size=0, seed=0), "sft")[0]
    assert all(r.preference_prob is None and r.weight is None and r.margin is None for r in sft)


@pytest.mark.parametrize("row, options, message", [
    ({"prompt": "p", "completions": ["a", "b"], "scores": [1, 0], "weight": 1.0}, {}, "'weight': only prompt/chosen/"
     "rejected rows carry preference_prob, weight, margin; this row is ranked"),
    ({"prompt": "p", "completion": "a", "margin": 1.0}, {}, "'margin': only .* this row is prompt/completion"),
    ({"prompt": "p", "completion": "a", "label": True, "preference_prob": 0.5}, {"unpaired": True},
     "'preference_prob': only .* this row is unpaired"),
    ({**PAIRS[1], "weight": 1.0}, {"unpaired": True}, "'weight': unpaired losses .* read no per-pair fields"),
    ({**PAIRS[1], "preference_prob": 0.5}, {"ranked": True}, "'preference_prob': listwise losses and curriculum"),
])
def test_fields_on_rows_or_losses_without_pairs_are_refused(tmp_path, row, options, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [PAIRS[0], row])
    with pytest.raises(D.DataError, match=f"rows.jsonl:2: field {message}"):
        load_records(path, **options)


def test_a_field_on_some_rows_only_names_the_first_row_without_it(tmp_path):
    rows = pairs_with(weight=WEIGHTS)
    del rows[3]["weight"]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(D.DataError, match=f"mixed.jsonl:4: missing field 'weight', which {path}:1 has"):
        load_records(path)
    # Records built elsewhere (online training) are checked where they become a dataset.
    records = [D.Record("gen#0", "p", ["a", "b"], preference_prob=0.5), D.Record("gen#1", "p", ["a", "b"])]
    with pytest.raises(D.DataError, match="gen#1: missing field 'preference_prob', which gen#0 has"):
        D.build_dataset(records, CharTokenizer(), 16, [])
    records[1].preference_prob = 1.5
    with pytest.raises(D.DataError, match=r"gen#1: field 'preference_prob': expected a probability in \[0, 1\]"):
        D.build_dataset(records, CharTokenizer(), 16, [])


def test_soft_label_losses_are_those_that_read_preference_probs():
    """PreferenceObjective refuses soft labels for a loss outside SOFT_LABEL_LOSSES: it must be every loss whose
    value depends on preference_probs."""
    generator = torch.Generator().manual_seed(0)
    values = lambda: torch.randn(4, generator=generator, dtype=torch.float64)  # noqa: E731
    inputs = dict(chosen_logps=values(), rejected_logps=values(), ref_chosen_logps=values(),
                  ref_rejected_logps=values(), chosen_lengths=torch.full((4,), 3.0),
                  rejected_lengths=torch.full((4,), 5.0),
                  modpo_weights=[1.0, 0.5], chosen_margin_rewards=values(), rejected_margin_rewards=values(),
                  chosen_seq_kl=values().abs(), rejected_seq_kl=values().abs())

    def reads(name):
        try:
            low, high = (pairwise_loss(**inputs, loss_type=name, preference_probs=torch.full((4,), p))[0]
                         for p in (0.2, 0.9))
        except ValueError:  # exo_pair: its label_smoothing must be > 0, which soft labels exclude
            return False
        return not torch.allclose(low, high)

    readers = {name for name in {**LOSSES, **TOKEN_LEVEL_LOSSES} if reads(name)}
    assert readers == set(O.PreferenceObjective.SOFT_LABEL_LOSSES)


@pytest.mark.parametrize("fields, overrides, message", [
    ({"preference_prob": PROBS}, {"loss_type": "ipo"}, "carry 'preference_prob', which loss_type 'ipo' does not read"),
    ({"preference_prob": PROBS}, {"label_smoothing": 0.1}, "own label_smoothing .* set label_smoothing to 0"),
    ({}, {"loss_type": "sppo"}, "loss_type 'sppo' reads each pair's 'preference_prob'"),
    ({"weight": WEIGHTS}, {"wpo": True}, "carry 'weight' and wpo is on"),
    ({"weight": WEIGHTS}, {"loss_type": "aot"}, "'weight', which loss_type 'aot' cannot take"),
    ({"margin": MARGINS}, {}, "carry 'margin', which only loss_type 'modpo' reads"),
    ({"margin": MARGINS}, {"loss_type": "modpo", "loss_params": {"modpo_weights": [1.0, 0.5, 0.5]}},
     r"set loss_params.modpo_weights to \[w_0, w_1\]"),
    ({}, {"loss_type": "modpo", "loss_params": {"modpo_weights": [1.0, 0.5]}}, "give every row a 'margin'"),
])
def test_a_field_the_loss_does_not_read_or_needs_is_refused(tmp_path, fields, overrides, message):
    records = [D.Record(f"row{i}", pair["prompt"], [pair["chosen"], pair["rejected"]],
                        **{name: values[i] for name, values in fields.items()}) for i, pair in enumerate(PAIRS)]
    batch = D.collate(D.build_dataset(records, CharTokenizer(), 16, []), [0, 1], packing=False)
    objective = O.PreferenceObjective(make_config(tmp_path, **overrides), references.no_reference)
    with pytest.raises(ValueError, match=message):
        objective.prepare(None, [batch])


def prepared_trainer(tmp_path, rows, **overrides):
    """A trainer on `rows`, moved off its frozen reference so that no loss sits at its symmetric point."""
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    trainer = L.Trainer(make_config(tmp_path, data=path, eval_fraction=0.0, sft_steps=0, **overrides))
    trainer.prepare("dpo")
    nudge(trainer.model)
    return trainer


def sequence_logps(trainer, indices):
    """Policy and reference log-prob sums [P] of chosen and rejected, from a padded batch and materialised logits."""
    batch = D.collate(trainer.stages["dpo"].train_set, indices, packing=False)
    with torch.no_grad():
        sums = M.sequence_logprobs(trainer.lm, batch, "reference")[0].double()
        ref_chosen, ref_rejected = (ref.double() for ref in trainer.stages["dpo"].objective.reference(batch))
    pairs = len(indices)
    return sums[:pairs], sums[pairs:], ref_chosen, ref_rejected


def row_values(dataset, indices, rows, field):
    """`field` of each example's row, read back from the rows written (examples are named path:line)."""
    return torch.tensor([rows[int(dataset.examples[i].where.rsplit(":", 1)[1]) - 1][field] for i in indices],
                        dtype=torch.float64)


LAYOUTS = {"padded": {}, "packed": {"packing": True}, "shared": {"shared_prompt": True}}


@pytest.mark.parametrize("impl, layout", [(impl, layout) for impl in ("fused", "reference") for layout in LAYOUTS]
                         + [("fused-budget", "packed")])
def test_row_values_reach_the_loss(tmp_path, impl, layout):
    """DPO with soft labels plus MODPO with margins, each pair weighted: the step's loss is the mean over pairs
    of w (-(p log σ(βδ) + (1-p) log σ(-βδ)) - log σ((βδ - w_1 m) / w_0)), in every layout and loss_impl."""
    rows = pairs_with(preference_prob=PROBS, weight=WEIGHTS, margin=MARGINS)
    beta, modpo_weights = 0.5, [0.8, 0.6]
    budget = {"strategy": "budget", "budget": "4KB"} if impl == "fused-budget" else {}
    trainer = prepared_trainer(tmp_path, rows, loss_type=["sigmoid", "modpo"], beta=beta,
                               loss_params={"modpo_weights": modpo_weights}, loss_impl=impl.split("-")[0],
                               **LAYOUTS[layout], **budget)
    train_set, objective = trainer.stages["dpo"].train_set, trainer.stages["dpo"].objective
    indices = list(range(len(PAIRS)))
    batches = [D.collate(train_set, indices[i:i + 4], packing=trainer.config.packing,
                         shared_prompt=trainer.config.shared_prompt) for i in (0, 4)]
    record = L.run_batches(trainer.lm, objective, batches, trainer.autocast, backward=True)

    chosen, rejected, ref_chosen, ref_rejected = sequence_logps(trainer, indices)
    p, w, m = (row_values(train_set, indices, rows, field) for field in ("preference_prob", "weight", "margin"))
    logits = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    soft_dpo = -p * F.logsigmoid(logits) - (1 - p) * F.logsigmoid(-logits)
    modpo = -F.logsigmoid((logits - modpo_weights[1] * m) / modpo_weights[0])
    expected = (w * (soft_dpo + modpo)).mean()
    terms = batches[0].input_ids.numel() * 2 + trainer.model.config.vocab_size
    assert_fp32_close(torch.tensor(record["loss"], dtype=torch.float64), expected, terms, "loss")
    # The same from pairwise_loss, the definition both paths call.
    by_library = pairwise_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type=["sigmoid", "modpo"], beta=beta,
                               preference_probs=p, pair_weights=w, chosen_margin_rewards=m,
                               rejected_margin_rewards=torch.zeros_like(m), modpo_weights=modpo_weights)[0].mean()
    torch.testing.assert_close(by_library, expected, rtol=1e-12, atol=0)


def test_a_pair_of_weight_zero_gives_no_gradient(tmp_path):
    """Pairs 0-3 with weights [0, 1, 1, 1] give 3/4 of the gradient of pairs 1-3 unweighted (normalised by 4 and
    by 3 pairs): pair 0 contributes nothing."""
    trainer = prepared_trainer(tmp_path, pairs_with(weight=[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), packing=True)
    config, objective = trainer.config, trainer.stages["dpo"].objective
    unweighted = D.build_dataset([D.Record(f"row{i}", pair["prompt"], [pair["chosen"], pair["rejected"]])
                                  for i, pair in enumerate(PAIRS)], trainer.tokenizer, config.max_length, [],
                                 config.append_eos)
    gradients = []
    for dataset, indices in ((trainer.stages["dpo"].train_set, [0, 1, 2, 3]), (unweighted, [1, 2, 3])):
        trainer.model.zero_grad()
        L.run_batches(trainer.lm, objective, [D.collate(dataset, indices, packing=True)], trainer.autocast,
                      backward=True)
        gradients.append({name: p.grad.clone() for name, p in trainer.model.named_parameters()})
    terms = 4 * 2 * 16 + trainer.model.config.vocab_size
    for name, grad in gradients[1].items():
        assert grad.abs().max() > 0, name
        assert_fp32_close(gradients[0][name], 3 / 4 * grad, terms, name)


def test_a_training_run_reads_the_rows_soft_labels(tmp_path):
    """Trainer end to end with SPPO on soft labels: at the first step the policy is its reference (Δ = 0), so
    the logged loss is the mean of 2 ((p - 1/2) / β)² over the step's pairs."""
    rows = pairs_with(preference_prob=PROBS)
    path = write_jsonl(tmp_path / "soft.jsonl", rows)
    config = make_config(tmp_path, data=path, eval_fraction=0.0, sft_steps=0, steps=1, loss_type="sppo", beta=0.5,
                         micro_batch_size=2, grad_accum_steps=2, packing=True)
    R.train(config)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first = next(record for record in log if record["kind"] == "train")
    assert first["step"] == 1
    indices = D.step_indices(len(rows), 0, config.batch_size, config.seed, "dpo")
    p = torch.tensor([PROBS[i] for i in indices], dtype=torch.float64)  # no split: example i is row i
    assert first["loss"] == pytest.approx(float((2 * ((p - 0.5) / config.beta) ** 2).mean()), rel=1e-5)
    assert not math.isclose(first["loss"], 0.0)
