"""prefops.training.online: the online loop from config, its references, resume and bad judges.

A 1-layer Llama of width 32 on the bundled sort task, a few prompts a round; the
default online job's ordering against offline DPO is asserted in test_online_job.py.
"""
import itertools
import json
import math
import statistics
import sys
import types
import zlib

import pytest
import torch

from helpers import interrupted_then_resumed, save_tiny_reward_model
from prefops.training import config as C, data as D, model as M, run as R
from prefops.training.online import OnlineTrainer

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2}
ONLINE = {"rounds": 3, "prompts_per_round": 8, "samples_per_prompt": 4, "steps_per_round": 2, "eval_prompts": 8,
          "sample_batch_size": 4}


def make_config(tmp_path, online=None, **overrides):
    values = dict(model_config=TINY, data="synthetic:sort", synthetic_size=64, max_length=16, sft_steps=3,
                  micro_batch_size=4, win_rate_samples=8, log_every=1, checkpoint_every=1, plot=False,
                  tensorboard=False, out_dir=str(tmp_path / "run"), online={**ONLINE, **(online or {})})
    values.update(overrides)
    return C.load(None, values)


def records(out_dir, kind):
    return [r for r in map(json.loads, open(f"{out_dir}/log.jsonl")) if r["kind"] == kind]


def without_timings(record):
    return {k: v for k, v in record.items() if not (k.endswith("_per_s") or k.endswith("_s"))}


def test_online_run_logs_rounds(tmp_path):
    config = make_config(tmp_path)
    R.train(config)
    rounds = [r for r in records(config.out_dir, "eval") if "round" in r]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["step"] for r in rounds] == [2, 4, 6]
    for record in rounds:
        assert record["judge_calls"] > 0 and record["pairs"] >= 1
        assert 0 <= record["win_rate/vs_start"] <= 1 and 0 <= record["win_rate/vs_previous"] <= 1
        assert record["kl"] >= -1e-6 and 0 < record["top_k_mass"] <= 1 + 1e-6
        for key in ("reward/mean", "reward/std", "pair_yield", "generation_tokens_per_s", "sample_s", "judge_s",
                    "train_s", "win_rate", "rewards/accuracies", "logps/accuracies", "diagnostics/top_k_mass"):
            assert math.isfinite(record[key]), key
    # The judge budget: each round's prompts * samples (evaluation's calls are not counted).
    assert [r["judge_calls"] for r in rounds] == [32, 64, 96]
    train = records(config.out_dir, "train")
    assert [r["step"] for r in train if r["stage"] == "dpo"] == list(range(1, 7))


@pytest.mark.parametrize("overrides", [
    dict(loss_type="kto"),
    dict(loss_type="plackett_luce", online={"pairs": "ranked"}),
    dict(loss_type="tdpo2"),
    dict(loss_type="sppo", online={"soft_labels": True, "soft_label_scale": 2.0}),
    dict(loss_type="ipo", online={"pairs": "all_pairs", "mixture_alpha": 0.5, "top_p": 0.9, "temperature": 0.8}),
], ids=["unpaired", "listwise", "token_level", "soft_labels", "all_pairs_mixture"])
def test_every_loss_family_trains_online(tmp_path, overrides):
    config = make_config(tmp_path, **{**overrides, "online": {"rounds": 2, **overrides.get("online", {})}})
    R.train(config)
    rounds = [r for r in records(config.out_dir, "eval") if "round" in r]
    assert len(rounds) == 2 and all(math.isfinite(r["loss"]) for r in records(config.out_dir, "train"))


@pytest.mark.parametrize("reference_update", ["never", "round"])
def test_resume_mid_round_reproduces_uninterrupted_run(tmp_path, reference_update):
    straight = make_config(tmp_path, out_dir=str(tmp_path / "straight"), reference_update=reference_update)
    straight_trainer = OnlineTrainer(straight)
    straight_trainer.train()

    config = make_config(tmp_path, out_dir=str(tmp_path / "resumed"), reference_update=reference_update)
    resumed = interrupted_then_resumed(OnlineTrainer, config, step=3)  # the middle of the second round

    for kind in ("train", "eval"):
        assert list(map(without_timings, records(config.out_dir, kind))) == list(
            map(without_timings, records(straight.out_dir, kind))), kind
    for name, tensor in straight_trainer.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name


def test_pairs_train_on_the_sampled_token_ids(tmp_path, monkeypatch):
    """The round's examples hold the ids generate() returned, with no EOS appended to a sample cut at
    max_new_tokens (the text encoded again would get one)."""
    from prefops.training import sampling
    sampled = set()
    sample = sampling.sample

    def spy(model, tokenizer, prompts, **kwargs):
        samples = sample(model, tokenizer, prompts, **kwargs)
        sampled.update((prompt, tuple(ids)) for prompt, group in zip(prompts, samples.completion_ids) for ids in group)
        return samples
    monkeypatch.setattr(sampling, "sample", spy)
    config = make_config(tmp_path, online={"rounds": 1, "max_new_tokens": 3})
    trainer = OnlineTrainer(config)
    datasets = []
    round_dataset = trainer.round_dataset
    trainer.round_dataset = lambda current: datasets.append(round_dataset(current)) or datasets[-1]
    trainer.train()
    examples = datasets[0].examples
    eos = trainer.tokenizer.eos_token_id
    for example in examples:
        prompt = trainer.tokenizer.decode(example.prompt_ids)
        for ids in example.completion_ids:
            assert (prompt, tuple(ids)) in sampled
            assert len(ids) <= 3 and (eos not in ids or ids[-1] == eos)
    assert any(eos not in ids for example in examples for ids in example.completion_ids)  # cut short: no EOS added


def test_a_python_judge(tmp_path):
    """From Python any function judges (here longer answers win), in place of online.judge."""
    config = make_config(tmp_path, online={"judge": "task", "rounds": 1})
    seen = []

    def longer(prompts, completions):
        seen.extend(completions)
        return [len(c) for c in completions]
    trainer = OnlineTrainer(config, judge=longer)
    trainer.train()
    assert len(seen) == 32 + 2 * 8  # the round's samples, then the eval prompts before and after
    (round_,) = [r for r in records(config.out_dir, "eval") if "round" in r]
    assert round_["judge_calls"] == 32


def test_reference_refresh(tmp_path):
    """never: the SFT policy throughout; round: the policy at the start of each round."""
    for update in ("never", "round"):
        trainer = OnlineTrainer(make_config(tmp_path, reference_update=update, out_dir=str(tmp_path / update)))
        seen = []
        build = trainer.round_reference

        def spy():
            seen.append({k: v.clone() for k, v in trainer.reference_states[-1].items()})
            return build()
        trainer.round_reference = spy
        policy_at_round_start = []
        new_round = trainer.new_round

        def spy_round(index, reference_lm):
            policy_at_round_start.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
            return new_round(index, reference_lm)
        trainer.new_round = spy_round
        trainer.train()
        sft = torch.load(tmp_path / update / "sft.pt", weights_only=False)["model"]
        if update == "never":
            assert len(seen) == 1
            assert all(torch.equal(seen[0][k], sft[k]) for k in sft)
        else:
            assert len(seen) == 3  # the first round's, then one per later round
            for reference, policy in zip(seen, policy_at_round_start):
                assert all(torch.equal(reference[k], policy[k]) for k in policy)
            assert not all(torch.equal(seen[2][k], sft[k]) for k in sft)


def test_apo_reference_is_the_extrapolation(tmp_path):
    """APO: ref = log pi_t + alpha (log pi_t - log pi_{t-1}), from two models' float64 log-probs."""
    alpha = 0.7
    config = make_config(tmp_path, reference_update="round", online={"apo_alpha": alpha}, sft_steps=0)
    trainer = OnlineTrainer(config)
    older = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    newer = {k: v + 0.05 * torch.randn_like(v) for k, v in older.items()}
    trainer.reference_states = [older, newer]
    reference, _ = trainer.round_reference()
    rows = trainer.task.rows("preference", 6, seed=1)
    records_ = D.records_for([(f"t#{i}", row) for i, row in enumerate(rows)], "dpo")[0]
    dataset = D.build_dataset(records_, trainer.tokenizer, config.max_length, [], True, 0)
    batch = D.collate(dataset, list(range(6)), packing=False)
    chosen, rejected = reference(batch)

    def logps64(state):
        model, _ = M.build(config, torch.device("cpu"), trainer.task.alphabet)
        model.load_state_dict(state)
        model.double()
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        token = torch.log_softmax(logits, -1).gather(-1, batch.targets.clamp_min(0)[..., None])[..., 0]
        return torch.where(batch.targets != D.IGNORE_INDEX, token, 0.0).sum(-1)
    expected = (1 + alpha) * logps64(newer) - alpha * logps64(older)
    got = torch.cat([chosen, rejected]).double()
    # fp32 log-probs of ~5 tokens over a vocabulary of 15: a few ulps of their magnitude, times (1 + 2 alpha).
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    plain = (1 + 0) * logps64(newer)
    assert not torch.allclose(got, plain, rtol=1e-3)  # the extrapolation is not the plain reference


def flaky_judge_module():
    """A module:function judge that raises on every 5th sample and returns NaN on every 7th."""
    module = types.ModuleType("flaky_judge")
    calls = {"n": 0}

    def score(prompts, completions):
        values = []
        for prompt, completion in zip(prompts, completions):
            calls["n"] += 1
            if len(prompts) == 1 and calls["n"] % 5 == 0:
                raise ValueError("judge backend timed out")
            if calls["n"] % 7 == 0:
                values.append(float("nan"))
            else:
                values.append(float(sum(a == b for a, b in zip(sorted(prompt[:-1]), completion))))
        if len(prompts) > 1 and calls["n"] % 2 == 0:
            raise RuntimeError("batch failed")  # retried sample by sample
        return values
    module.score = score
    return module


def test_bad_judge_outputs_drop_samples_with_a_count(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "flaky_judge", flaky_judge_module())
    config = make_config(tmp_path, online={"judge": "flaky_judge:score"})
    R.train(config)
    rounds = [r for r in records(config.out_dir, "eval") if "round" in r]
    assert rounds[-1]["judge_failed"] > 0
    assert sum(r["dropped_nan"] for r in rounds) > 0
    assert "the judge failed on" in capsys.readouterr().out
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["online"]["round"]
    assert saved["records"] and all(isinstance(c, str) for record in saved["records"] for c in record["completions"])


@pytest.mark.parametrize("online, message", [
    ({"rounds": 0}, "online.rounds must be a positive integer"),
    ({"samples_per_prompt": 1}, "online.samples_per_prompt must be an integer >= 2"),
    ({"pairs": "best"}, "online.pairs must be one of best_worst"),
    ({"mixture_alpha": 1.5}, r"online.mixture_alpha must be a number in \[0, 1\]"),
    ({"apo_alpha": 0.5}, "needs|set reference_update: round"),
    ({"uncertainty_z": 1.0}, "judge_repeats >= 2 or make judge a list"),
    ({"judge": ["task"]}, "online.judge must be task, .* or a list of >= 2 of them"),
    ({"rounds": 2, "judges": "task"}, "online.judges is not an online key"),
    # One judgement per pair has no spread: a pairwise judge needs repeats or an ensemble too.
    ({"judge": "pairwise:online_judges:prefer", "uncertainty_z": 1.0}, "online.uncertainty_z needs the judge's "
                                                                       "spread: set judge_repeats >= 2"),
    ({"uncertainty_weighting": True}, "online.uncertainty_weighting needs the judge's spread"),
    ({"uncertainty_weighting": "yes"}, "online.uncertainty_weighting must be true or false; got 'yes'"),
])
def test_online_config_errors_name_the_key(tmp_path, online, message):
    with pytest.raises(C.ConfigError, match=message):
        make_config(tmp_path, online=online)


@pytest.mark.parametrize("overrides, message", [
    (dict(loss_type="kto"), "which an unpaired loss has none"),
    (dict(wpo=True), "which wpo sets its own"),
    (dict(loss_type="aot"), "which a loss that sorts a batch's pairs takes none"),
    (dict(loss_type="plackett_luce", online={"pairs": "ranked"}), "online.uncertainty_weighting acts on pairs"),
])
def test_uncertainty_weighting_refuses_losses_without_pair_weights(tmp_path, overrides, message):
    online = {"judge_repeats": 2, "uncertainty_weighting": True, **overrides.pop("online", {})}
    with pytest.raises(C.ConfigError, match=message):
        make_config(tmp_path, online=online, **overrides)


def test_reference_update_needs_rounds_or_stages(tmp_path):
    with pytest.raises(C.ConfigError, match="reference_update: round refreshes the reference each online round"):
        C.load(None, dict(reference_update="round"))
    with pytest.raises(C.ConfigError, match="reference_update: stage refreshes the reference at each curriculum"):
        C.load(None, dict(reference_update="stage"))


def sort_quality(prompt, completion):
    return sum(a == b for a, b in zip(sorted(prompt.rstrip("=")), completion)) - abs(len(completion) - 4)


def judge_module():
    """A pairwise judge (Bradley-Terry on the sort score) and a noisy scalar one, as module:function judges."""
    module = types.ModuleType("online_judges")
    noise = torch.Generator().manual_seed(0)

    def prefer(prompts, completions_a, completions_b):
        return [1 / (1 + math.exp(sort_quality(p, b) - sort_quality(p, a)))
                for p, a, b in zip(prompts, completions_a, completions_b)]

    def noisy(prompts, completions):
        return [sort_quality(p, c) + 0.3 * float(torch.randn((), generator=noise))
                for p, c in zip(prompts, completions)]
    module.prefer, module.noisy = prefer, noisy
    return module


def test_pairwise_judge_soft_labels_and_win_rates(tmp_path, monkeypatch):
    """A pairwise judge's P(a > b) gives the soft labels and the win rates (a probability, not a count)."""
    monkeypatch.setitem(sys.modules, "online_judges", judge_module())
    config = make_config(tmp_path, online={"judge": "pairwise:online_judges:prefer", "soft_labels": True})
    trainer = OnlineTrainer(config)
    captured = []
    new_round = trainer.new_round
    trainer.new_round = lambda index, ref: captured.append(new_round(index, ref)) or captured[-1]
    trainer.train()
    for current in captured:
        for record in current.records:
            prompt, (chosen, rejected) = record.prompt, record.completions
            expected = 1 / (1 + math.exp(sort_quality(prompt, rejected) - sort_quality(prompt, chosen)))
            assert record.preference_prob == pytest.approx(expected, rel=1e-12)
            assert record.preference_prob >= 0.5
    rounds = [r for r in records(config.out_dir, "eval") if "round" in r]
    # K = 4 completions: each prompt's 6 unordered pairs are judged once each.
    assert rounds[0]["judge_calls"] == 8 * 6
    assert all(0 < r["win_rate/vs_start"] < 1 for r in rounds)


@pytest.mark.parametrize("judging", [
    {"judge": "online_judges:noisy", "judge_repeats": 3},
    {"judge": ["online_judges:noisy", "online_judges:noisy", "online_judges:noisy"]},
], ids=["repeated", "ensemble"])
def test_uncertainty_filter(tmp_path, monkeypatch, judging):
    """Each sample is scored three times (repeated judging, or an ensemble of three judges); pairs whose gap is
    within z spreads are dropped."""
    kept = {}
    for z in (None, 3.0):
        monkeypatch.setitem(sys.modules, "online_judges", judge_module())
        config = make_config(tmp_path, out_dir=str(tmp_path / f"z{z}"), online={
            **judging, "uncertainty_z": z, "pairs": "all_pairs"})
        R.train(config)
        rounds = [r for r in records(config.out_dir, "eval") if "round" in r]
        assert all(r["judge_calls"] == 3 * 8 * 4 * (i + 1) for i, r in enumerate(rounds))
        kept[z] = rounds
    assert sum(r["dropped_uncertain"] for r in kept[3.0]) > 0 == sum(r["dropped_uncertain"] for r in kept[None])
    assert all(r["pairs"] + r["dropped_uncertain"] + r["dropped_identical"] == r["candidate_pairs"]
               for r in kept[3.0])


def upo_quality(prompt, completion):
    """The sort score, with ties between different texts broken by less than 0.01: equal scores would give
    equal mean win probabilities up to rounding, which would decide whether such a pair is a candidate."""
    return sort_quality(prompt, completion) + 0.01 * zlib.crc32(completion.encode()) / 2 ** 32


def upo_judge_module():
    """Pairwise judges with known noise: the n-th judgement of a pair is P(a > b) = b + o_n b (1 - b), b =
    sigmoid(q_a - q_b) the Bradley-Terry probability on upo_quality q, o_n = -1, 0, 1 (staying in [0, 1]).
    `repeated` takes o_n from its call count: the judge_repeats = 3 consecutive calls that judge a sampling
    batch take -1, 0 and 1 in some order; `member0..2` are an ensemble's three members."""
    module = types.ModuleType("upo_judges")
    calls = itertools.count()

    def judged(offset, prompts, completions_a, completions_b):
        return [b + offset * b * (1 - b) for b in (1 / (1 + math.exp(upo_quality(p, y) - upo_quality(p, x)))
                                                     for p, x, y in zip(prompts, completions_a, completions_b))]
    module.repeated = lambda *columns: judged(next(calls) % 3 - 1, *columns)
    for n in range(3):
        setattr(module, f"member{n}", lambda *columns, offset=n - 1: judged(offset, *columns))
    return module


@pytest.mark.parametrize("judging", [
    {"judge": "pairwise:upo_judges:repeated", "judge_repeats": 3},
    {"judge": [f"pairwise:upo_judges:member{n}" for n in range(3)]},
], ids=["repeated", "ensemble"])
def test_pairwise_uncertainty_filter_and_weights(tmp_path, monkeypatch, judging):
    """UPO's pairwise uncertainty: each pair's three judgements have mean b and standard error b (1 - b) / sqrt(3)
    (upo_judge_module), so with pairs: all_pairs every two different samples are a candidate, the one of higher
    quality chosen; exactly those with b - 1/2 <= z se are dropped, and the others weigh
    2 Phi((b - 1/2) / se) - 1 in the loss."""
    monkeypatch.setitem(sys.modules, "upo_judges", upo_judge_module())
    z = 3.0
    config = make_config(tmp_path, online={**judging, "rounds": 2, "pairs": "all_pairs", "uncertainty_z": z,
                                           "uncertainty_weighting": True})
    trainer = OnlineTrainer(config)
    judged, captured = [], []
    judgements, new_round = trainer.judgements, trainer.new_round
    trainer.judgements = lambda prompts, completions: judged.append((prompts, completions)) or judgements(
        prompts, completions)
    trainer.new_round = lambda index, ref: captured.append(new_round(index, ref)) or captured[-1]
    trainer.train()

    rounds = [r for r in records(config.out_dir, "eval") if "round" in r]
    assert [r["judge_calls"] for r in rounds] == [3 * 8 * 6, 2 * 3 * 8 * 6]  # 3 judgements of each pair of 4
    sampled = [(p, group) for prompts, completions in judged for p, group in zip(prompts, completions)
               if len(group) > 1]  # not the evaluation's single samples
    assert len(sampled) == 2 * 8
    for index, current in enumerate(captured):
        kept, dropped = [], 0
        for prompt, group in sampled[8 * index:8 * (index + 1)]:
            for x, y in itertools.combinations(group, 2):
                if x == y:  # no preference: not a candidate, or one dropped as identical
                    continue
                gap = upo_quality(prompt, x) - upo_quality(prompt, y)
                b = 1 / (1 + math.exp(-abs(gap)))
                d, se = b - 0.5, b * (1 - b) / math.sqrt(3)
                if d <= z * se:
                    dropped += 1
                else:
                    kept.append((prompt, *((x, y) if gap > 0 else (y, x)), 2 * statistics.NormalDist().cdf(-d / se)))
        assert current.stats["dropped_uncertain"] == dropped > 0
        got = sorted((r.prompt, *r.completions, r.weight) for r in current.records)
        kept.sort()
        assert [row[:3] for row in got] == [row[:3] for row in kept]
        # Kept pairs are sure (d > 3 se): their weights 2 Phi(d / se) - 1 lie within 1e-2 of 1, compared by
        # 1 - w = 2 Phi(-d / se), which erf's rounding (1e-16) leaves a few parts per million off.
        assert [1 - row[3] for row in got] == pytest.approx([row[3] for row in kept], rel=1e-5, abs=1e-15)
        # The weights reach the loss as the batch's pair_weights.
        batch = D.collate(trainer.round_dataset(current), list(range(len(current.records))), packing=False)
        assert batch.pair_weights.tolist() == pytest.approx([r.weight for r in current.records], rel=1e-6)


def test_prompts_from_a_file(tmp_path, monkeypatch):
    """online.prompts: each round's prompts are drawn from the file's rows (here judged by a function)."""
    monkeypatch.setitem(sys.modules, "online_judges", judge_module())
    pool = ["1234=", "9876=", "5511="]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in pool))
    config = make_config(tmp_path, online={"prompts": str(path), "judge": "online_judges:noisy", "rounds": 1})
    trainer = OnlineTrainer(config)
    assert set(trainer.eval_prompts) <= set(pool)
    captured = []
    new_round = trainer.new_round
    trainer.new_round = lambda index, ref: captured.append(new_round(index, ref)) or captured[-1]
    trainer.train()
    assert {record.prompt for record in captured[0].records} <= set(pool)


def test_reward_model_judge_from_a_local_directory(tmp_path):
    torch.manual_seed(0)
    save_tiny_reward_model(tmp_path / "rm", "0123456789=")
    config = make_config(tmp_path, online={"judge": f"reward_model:{tmp_path / 'rm'}", "rounds": 1})
    R.train(config)
    (round_,) = [r for r in records(config.out_dir, "eval") if "round" in r]
    assert round_["judge_calls"] == 32 and round_["judge_failed"] == 0 and round_["pairs"] >= 1
