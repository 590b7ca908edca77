"""The parts of online preference learning: sampling (and the policy/reference geometric mixture),
judges, and turning judged samples into training records."""
import copy
import math
import statistics

import pytest
import torch
import transformers

from conftest import decoder_tolerance, relative_error
from helpers import save_tiny_reward_model
from prefops.training.judges import (Ensemble, JudgeError, PairwiseJudge, make_judge, repeat_preferences,
                                     repeat_scores, scalar_preferences)
from prefops.training.pairing import build_records
from prefops.training.sampling import sample
from prefops.training.synthetic import TASKS
from prefops.training.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer("0123456789+=")
PROMPTS = ["1+2=", "3+45=", "6="]  # different lengths: left padding within a batch


def tiny_lm(seed, arch="llama"):
    torch.manual_seed(seed)
    ids = dict(vocab_size=len(TOKENIZER), pad_token_id=TOKENIZER.pad_token_id, bos_token_id=TOKENIZER.bos_token_id,
               eos_token_id=TOKENIZER.eos_token_id, tie_word_embeddings=False)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, **ids))
    else:  # learned absolute positions: left padding must not shift them (RoPE only sees relative ones)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                                     **ids))
    # Logits of a useful size; EOS as likely as "0" (id 4), so some rows stop early, and the pad id as likely as
    # "6" (id 10): sampled as a real token, it must stay in the completion.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        model.lm_head.weight[TOKENIZER.eos_token_id] = model.lm_head.weight[4]
        model.lm_head.weight[TOKENIZER.pad_token_id] = model.lm_head.weight[10]
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls: a second thread only adds synchronisation, badly so on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    return tiny_lm(0), tiny_lm(1)


def run(model, **kwargs):
    options = dict(k=2, max_new_tokens=5, seed=0, device="cpu", batch_size=4, progress=False)
    return sample(model, TOKENIZER, PROMPTS, **{**options, **kwargs})


# ----------------------------------------------------------------------------- sampling

# Seeds whose samples show both endings (EOS, max_new_tokens) and a sampled pad id.
@pytest.mark.parametrize("arch, seed", [("llama", 0), ("gpt2", 2)])
def test_mixture_scores_match_float64_full_prefix(arch, seed, monkeypatch):
    """Every step's final sampling scores (after all processors) equal ((1 - a) z_theta + a z_ref) / T, with the
    logits recomputed in float64 by both models on each row's whole unpadded prefix, without a cache: the
    reference's incremental cache, its positions under left padding, and the mixture acting before the
    temperature. GPT-2's learned absolute positions catch positions shifted by the padding."""
    policy, reference = tiny_lm(seed, arch), tiny_lm(seed + 1, arch)
    alpha, temperature = 0.3, 0.7
    steps, generate = [], policy.generate

    def recording(**kwargs):
        output = generate(**kwargs, output_scores=True, return_dict_in_generate=True)
        steps.append((kwargs["attention_mask"], output.sequences, torch.stack(output.scores, dim=1)))
        return output.sequences

    monkeypatch.setattr(policy, "generate", recording)
    samples = run(policy, reference=reference, mixture_alpha=alpha, temperature=temperature)
    assert len(steps) == 2  # 6 rows in batches of 4: the prompts straddle batches, padded differently

    policy64, reference64 = (copy.deepcopy(m).double().eval() for m in (policy, reference))
    errors, length, generated = [], 0, []
    for mask, sequences, scores in steps:
        width = mask.shape[1]
        for row in range(sequences.shape[0]):
            ids = sequences[row, width - int(mask[row].sum()):][None]  # the prompt unpadded, then every new token
            prompt = ids.shape[1] - (sequences.shape[1] - width)
            with torch.no_grad():
                z = [m(input_ids=ids, use_cache=False).logits[0, prompt - 1:-1] for m in (policy64, reference64)]
            expected = ((1 - alpha) * z[0] + alpha * z[1]) / temperature
            scale = ((1 - alpha) * z[0].abs() + alpha * z[1].abs()) / temperature
            errors += [relative_error(scores[row, t], expected[t], scale[t]) for t in range(scores.shape[1])]
            length = max(length, ids.shape[1])
            generated.append(sequences[row, width:].tolist())
    assert max(errors) <= decoder_tolerance(policy.config, length), max(errors)

    # The Samples: ids up to and including the first EOS, decoded without special tokens.
    eos = TOKENIZER.eos_token_id
    flat = [ids for group in samples.completion_ids for ids in group]
    assert [len(group) for group in samples.completion_ids] == [2, 2, 2]
    assert any(ids[-1] == eos for ids in flat) and any(eos not in ids for ids in flat)  # both endings occur
    assert any(TOKENIZER.pad_token_id in ids[:-1] for ids in flat)
    for ids, row in zip(flat, generated, strict=True):
        assert ids == row[:len(ids)] and eos not in ids[:-1] and (ids[-1] == eos or len(ids) == 5)
    assert samples.new_tokens == sum(map(len, flat))
    assert samples.completions == [[TOKENIZER.decode(ids) for ids in group] for group in samples.completion_ids]


def test_sampling_reproducible_rng_and_modes_untouched(models):
    policy, reference = models
    policy.train()
    reference.eval()
    state = torch.get_rng_state()
    first = run(policy, temperature=0.8, top_p=0.9, reference=reference, mixture_alpha=0.5)
    assert torch.equal(torch.get_rng_state(), state)
    assert policy.training and not reference.training
    again = run(policy, temperature=0.8, top_p=0.9, reference=reference, mixture_alpha=0.5)
    assert again.completion_ids == first.completion_ids
    other = run(policy, temperature=0.8, top_p=0.9, reference=reference, mixture_alpha=0.5, seed=1)
    assert other.completion_ids != first.completion_ids
    assert (run(policy, reference=reference, mixture_alpha=0.0).completion_ids
            == run(policy).completion_ids)
    policy.eval()


def test_mixture_alpha_one_samples_the_reference(models):
    """At a = 1 the mixture is the reference alone: its incremental cache reproduces the reference's own
    generate token for token."""
    policy, reference = models
    assert (run(policy, reference=reference, mixture_alpha=1.0, max_new_tokens=8).completion_ids
            == run(reference, max_new_tokens=8).completion_ids)
    assert (run(policy, reference=reference, mixture_alpha=0.5, max_new_tokens=8).completion_ids
            != run(policy, max_new_tokens=8).completion_ids)


def test_sampling_rejects_bad_options(models):
    policy, _ = models
    for options, name in (({"k": 0}, "k"), ({"temperature": 0.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                          ({"mixture_alpha": 0.5}, "reference"), ({"mixture_alpha": 1.5}, "mixture_alpha")):
        with pytest.raises(ValueError, match=name):
            run(policy, **options)


# ----------------------------------------------------------------------------- judges

def length_score(prompts, completions):
    return [len(c) for c in completions]


def flaky_score(prompts, completions):
    """Raises on a batch holding "boom"; per sample: NaN, inf and non-numbers for those completions."""
    if "boom" in completions:
        raise RuntimeError("judge crashed")
    return [{"nan": math.nan, "inf": math.inf, "str": "7", "none": None}.get(c, len(c)) for c in completions]


def short_score(prompts, completions):
    return [1.0] * (len(completions) - 1)


ASKED = []


def longer_wins(prompts, completions_a, completions_b):
    """P(a beats b) = sigmoid(len(a) - len(b)); garbage above 1 for "bad", raises for "boom"."""
    ASKED.extend(zip(completions_a, completions_b))
    if "boom" in completions_a + completions_b:
        raise RuntimeError("judge crashed")
    return [1.5 if "bad" in (a, b) else 1 / (1 + math.exp(len(b) - len(a)))
            for a, b in zip(completions_a, completions_b)]


def assert_scores(actual, expected):
    expected = torch.tensor(expected, dtype=torch.float64)
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, equal_nan=True, rtol=1e-12, atol=0)


def test_task_judge_scores_and_counts_unparsable():
    judge = make_judge("task", task=TASKS["addition"])
    scores = judge.scores(["1+2=", "4+4="], [["3", "5", "x"], ["8", "", "0"]])
    assert_scores(scores, [[0, -2, math.nan], [0, math.nan, -8]])
    assert (judge.calls, judge.failed) == (6, 2)
    with pytest.raises(JudgeError, match="task="):
        make_judge("task")


def test_function_judge_retries_per_sample_and_nans_garbage():
    judge = make_judge(f"{__name__}:flaky_score")
    scores = judge.scores(["p", "q"], [["ab", "boom", "nan"], ["inf", "str", "none"]])
    assert_scores(scores, [[2, math.nan, math.nan], [math.nan, math.nan, math.nan]])
    assert (judge.calls, judge.failed) == (6, 5) and "judge crashed" in judge.last_error
    assert_scores(make_judge(f"{__name__}:length_score").scores(["p"], [["a", "abc"]]), [[1, 3]])
    with pytest.raises(JudgeError, match=f"{__name__}:short_score.*returned 2 values for 3"):
        make_judge(f"{__name__}:short_score").scores(["p"], [["a", "b", "c"]])
    for spec, message in (("no_such_module_xyz:f", "cannot import"), (f"{__name__}:missing", "no function"),
                          ("nonsense", "expected one of")):
        with pytest.raises(JudgeError, match=message):
            make_judge(spec)


def test_pairwise_judge_asks_each_pair_once():
    ASKED.clear()
    judge = make_judge(f"pairwise:{__name__}:longer_wins")
    assert judge.pairwise
    prefs = judge.preferences(["p"], [["a", "abc", "ab"]])
    assert sorted(ASKED) == sorted([("a", "abc"), ("a", "ab"), ("abc", "ab")]) and judge.calls == 3
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [[[0.5, s(-2), s(-1)], [s(2), 0.5, s(1)], [s(1), s(-1), 0.5]]]
    assert_scores(prefs, expected)
    assert_scores(judge.scores(["p"], [["a", "abc", "ab"]]),
                  [[(s(-2) + s(-1)) / 2, (s(2) + s(1)) / 2, (s(1) + s(-1)) / 2]])
    # A pair out of [0, 1] or raising becomes NaN; scores average the comparisons that did not fail.
    judge = make_judge(f"pairwise:{__name__}:longer_wins")
    prefs = judge.preferences(["p"], [["a", "bad", "boom"]])
    nan = math.nan
    assert_scores(prefs, [[[0.5, nan, nan], [nan, 0.5, nan], [nan, nan, 0.5]]])
    assert (judge.calls, judge.failed) == (3, 3)
    assert_scores(judge.scores(["p"], [["a", "bad", "ab"]]), [[s(-1), nan, s(1)]])
    with pytest.raises(JudgeError, match="at least 2"):
        judge.scores(["p"], [["a"]])


def test_scalar_preferences():
    nan = math.nan
    prefs = scalar_preferences(torch.tensor([[1.0, 3.0, 3.0, nan]], dtype=torch.float64))
    assert_scores(prefs, [[[0.5, 0, 0, nan], [1, 0.5, 0.5, nan], [1, 0.5, 0.5, nan], [nan, nan, nan, nan]]])


def test_reward_model_judge_matches_unbatched_float64(tmp_path):
    torch.manual_seed(0)
    # No pad_token_id in the model's config: the judge must take it from the tokenizer to pool batched rows.
    model, tokenizer = save_tiny_reward_model(tmp_path, "0123456789+= abc", hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              pad_token_id=None)
    config = model.config

    judge = make_judge(f"reward_model:{tmp_path}", batch_size=4)
    prompts, completions = ["1+2=", "10+20="], [["3", "30 abc", "c"], ["30", "3", "abcabc"]]
    scores = judge.scores(prompts, completions)
    assert judge.last_error is None and judge.calls == 6  # no batch failed over to per-sample retries
    model64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        expected = torch.tensor([[model64(input_ids=tokenizer(p + c, return_tensors="pt").input_ids).logits[0, 0]
                                  for c in group] for p, group in zip(prompts, completions)], dtype=torch.float64)
    assert relative_error(scores, expected) <= decoder_tolerance(config, 10)
    assert len(set(scores.flatten().tolist())) == 6

    config.num_labels = 2
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "two")
    tokenizer.save_pretrained(tmp_path / "two")
    with pytest.raises(JudgeError, match="one label"):
        make_judge(f"reward_model:{tmp_path / 'two'}")
    with pytest.raises(JudgeError, match="not a directory"):
        make_judge(f"reward_model:{tmp_path / 'missing'}")


class Counting:
    """A stochastic judge: the n-th scoring returns len(completion) + n; the second scoring fails on "x"."""

    def __init__(self):
        self.n = 0

    def __call__(self, prompts, completions):
        self.n += 1
        return [math.nan if (c == "x" and self.n == 2) else len(c) + self.n for c in completions]


def test_ensemble_and_repeat_scores():
    from prefops.training.judges import FunctionJudge

    first = FunctionJudge("first", length_score)
    second = FunctionJudge("second", lambda prompts, completions: [2 * len(c) + 1 for c in completions])
    ensemble = Ensemble([first, make_judge(f"{__name__}:flaky_score"), second])
    mean, spread = ensemble.scores_with_spread(["p"], [["ab", "nan"]])
    # Members 2, 2, 5 on "ab": mean 3, sample std sqrt(((1 + 1 + 4) / 2)) = sqrt(3); a member's NaN is NaN.
    assert_scores(mean, [[3, math.nan]])
    assert_scores(spread, [[math.sqrt(3), math.nan]])
    assert ensemble.calls == 6 and ensemble.failed == 1
    ensemble.calls, ensemble.failed = 100, 10  # a resumed run's totals: the members count on from there
    ensemble.scores(["p"], [["ab"]])
    assert (ensemble.calls, ensemble.failed) == (103, 10)
    assert_scores(ensemble.scores(["p"], [["a"]]), [[(1 + 1 + 3) / 3]])
    with pytest.raises(JudgeError, match="at least 2"):
        Ensemble([first])

    judge = FunctionJudge("counting", Counting())
    mean, std = repeat_scores(judge, ["p"], [["ab", "x"]], repeats=3)
    # "ab": 3, 4, 5 -> mean 4, std 1; "x": 2, NaN, 4 -> mean 3, std sqrt(2).
    assert_scores(mean, [[4, 3]])
    assert_scores(std, [[1, math.sqrt(2)]])
    assert_scores(scalar_preferences(mean), [[[0.5, 1], [0, 0.5]]])
    with pytest.raises(ValueError, match="repeats"):
        repeat_scores(judge, ["p"], [["ab"]], repeats=1)


# Pairwise uncertainty (UPO): a pairwise judge whose n-th judgement of a pair (a repeat, or an ensemble's n-th
# member) is P(a beats b) = 1/2 + (len(a) - len(b)) / 10 + OFFSETS[n]; a pair holding a text of FAILS[n]
# comes back NaN on that judgement.
OFFSETS = (-0.1, 0.0, 0.1)
FAILS = ({"y"}, {"x", "y"}, set())
UPO_COMPLETIONS = ["a", "abc", "x", "y"]


def judged_with_offset(n, prompts, completions_a, completions_b):
    return [math.nan if FAILS[n] & {a, b} else 0.5 + (len(a) - len(b)) / 10 + OFFSETS[n]
            for a, b in zip(completions_a, completions_b)]


def member0(*columns):
    return judged_with_offset(0, *columns)


def member1(*columns):
    return judged_with_offset(1, *columns)


def member2(*columns):
    return judged_with_offset(2, *columns)


class Repeated:
    """The same judge asked again: its n-th call is judgement n."""

    def __init__(self):
        self.n = 0

    def __call__(self, *columns):
        self.n += 1
        return judged_with_offset(self.n - 1, *columns)


def expected_mean_and_standard_error(completions):
    """Each pair's mean and standard error over the judgements that did not fail, by the statistics module."""
    k = len(completions)
    mean, error = torch.full((1, k, k), 0.5, dtype=torch.float64), torch.zeros((1, k, k), dtype=torch.float64)
    for i in range(k):
        for j in range(i + 1, k):
            a, b = completions[i], completions[j]
            values = [0.5 + (len(a) - len(b)) / 10 + OFFSETS[n] for n in range(3) if not FAILS[n] & {a, b}]
            if len(values) < 2:
                mean[0, i, j] = mean[0, j, i] = error[0, i, j] = error[0, j, i] = math.nan
                continue
            mean[0, i, j], mean[0, j, i] = statistics.fmean(values), 1 - statistics.fmean(values)
            error[0, i, j] = error[0, j, i] = statistics.stdev(values) / math.sqrt(len(values))
    return mean, error


def test_pairwise_repeats_and_ensemble_give_mean_and_standard_error():
    """Three judgements per pair, by one judge asked three times or by three judges: the mean and standard error
    of those that did not fail; NaN where fewer than two did (a pair with "y")."""
    mean, error = expected_mean_and_standard_error(UPO_COMPLETIONS)
    # a vs abc: 0.2, 0.3, 0.4 -> mean 0.3, se 0.1 / sqrt(3); a vs x: 0.4 and 0.6 (x fails once) -> 0.5, se 0.1.
    assert mean[0, 0, 1] == pytest.approx(0.3, rel=1e-12) and error[0, 0, 1] == pytest.approx(0.1 / math.sqrt(3))
    assert mean[0, 0, 2] == pytest.approx(0.5, rel=1e-12) and error[0, 0, 2] == pytest.approx(0.1, rel=1e-12)

    judge = PairwiseJudge("repeated", Repeated())
    got = repeat_preferences(judge, ["p"], [UPO_COMPLETIONS], repeats=3)
    ensemble = make_judge([f"pairwise:{__name__}:member{n}" for n in range(3)])
    assert ensemble.pairwise
    for preferences, standard_error in (got, ensemble.preferences_with_spread(["p"], [UPO_COMPLETIONS])):
        assert_scores(preferences, mean.tolist())
        assert_scores(standard_error, error.tolist())
    # Every unordered pair asked 3 times; NaN: the 3 pairs holding y on judgements 0 and 1, those holding x on 1.
    assert (judge.calls, judge.failed) == (3 * 6, 3 + 3 + 2)
    assert (ensemble.calls, ensemble.failed) == (3 * 6, 3 + 3 + 2)
    # A completion's score: its mean win probability over the pairs that did not fail.
    assert_scores(ensemble.scores(["p"], [UPO_COMPLETIONS]), [[statistics.fmean([0.3, 0.5]),
                                                               statistics.fmean([0.7, 0.7]),
                                                               statistics.fmean([0.5, 0.3]), math.nan]])
    with pytest.raises(ValueError, match="repeats must be an integer >= 2"):
        repeat_preferences(judge, ["p"], [UPO_COMPLETIONS], repeats=1)
    with pytest.raises(JudgeError, match="all scalar or all pairwise"):
        make_judge([f"{__name__}:length_score", f"pairwise:{__name__}:member0"])


# ----------------------------------------------------------------------------- pairing

PAIR_PROMPTS = ["p0", "p1", "p2"]
PAIR_COMPLETIONS = [["a", "b", "c", "d"], ["e", "f", "g", "h"], ["i", "j", "k", "l"]]
PAIR_SCORES = [[1.0, 3.0, math.nan, 0.0],  # c failed
               [2.0, 2.0, 2.0, 2.0],       # all tie: nothing
               [0.5, 0.0, 2.0, 0.5]]


def pairs_of(records):
    return [(r.where, r.prompt, *r.completions) for r in records]


@pytest.mark.parametrize("mode, options, expected", [
    ("best_worst", {}, ["p0[1>3]", "p2[2>1]"]),
    ("all_pairs", {}, ["p0[0>3]", "p0[1>0]", "p0[1>3]", "p2[0>1]", "p2[2>0]", "p2[2>1]", "p2[2>3]", "p2[3>1]"]),
    # Gaps exactly 1.5 (k - i, k - l) are kept.
    ("margin", {"min_margin": 1.5}, ["p0[1>0]", "p0[1>3]", "p2[2>0]", "p2[2>1]", "p2[2>3]"]),
])
def test_pair_modes(mode, options, expected):
    records, stats = build_records(PAIR_PROMPTS, PAIR_COMPLETIONS, PAIR_SCORES, mode=mode, where="r1", **options)
    letters = {f"p{p}[{i}>{j}]": (PAIR_COMPLETIONS[p][i], PAIR_COMPLETIONS[p][j])
               for p in range(3) for i in range(4) for j in range(4)}
    assert pairs_of(records) == [(f"r1#{key}", key[:2], *letters[key]) for key in expected]
    assert all(r.kind == "pairwise" and r.preference_prob is None for r in records)
    assert stats == dict(prompts=3, completions=12, dropped_nan=1, candidate_pairs=len(expected),
                         dropped_identical=0, dropped_uncertain=0, dropped_nan_pairs=0, pairs=len(expected),
                         records=len(expected), pair_yield=len(expected) / 3)


def test_ranked_mode():
    records, stats = build_records(PAIR_PROMPTS, PAIR_COMPLETIONS, PAIR_SCORES, mode="ranked")
    assert [(r.where, r.prompt, r.completions, r.scores) for r in records] == [
        ("online#p0", "p0", ["a", "b", "d"], [1.0, 3.0, 0.0]),
        ("online#p2", "p2", ["i", "j", "k", "l"], [0.5, 0.0, 2.0, 0.5])]
    assert all(r.kind == "ranked" for r in records)
    assert (stats["dropped_nan"], stats["pairs"], stats["records"], stats["pair_yield"]) == (1, 3 + 5, 2, 8 / 3)


def test_soft_labels():
    records, _ = build_records(PAIR_PROMPTS, PAIR_COMPLETIONS, PAIR_SCORES, soft_labels=True, soft_label_scale=2.0)
    assert [r.preference_prob for r in records] == pytest.approx([1 / (1 + math.exp(-1.5)), 1 / (1 + math.exp(-1))],
                                                                 rel=1e-12)
    preferences = torch.full((3, 4, 4), 0.5, dtype=torch.float64)
    preferences[0, 1, 3], preferences[2, 2, 1] = 0.9, math.nan  # the pairwise judge failed on p2's pair
    records, stats = build_records(PAIR_PROMPTS, PAIR_COMPLETIONS, PAIR_SCORES, soft_labels=True,
                                   preferences=preferences)
    assert [(r.where, r.preference_prob) for r in records] == [("online#p0[1>3]", 0.9)]
    assert (stats["dropped_nan_pairs"], stats["pairs"]) == (1, 1)
    # The direct comparison orients a pair: mean win probabilities (the scores) need not order it alike.
    preferences[0, 1, 0], preferences[0, 0, 1] = 0.3, 0.7
    records, _ = build_records(PAIR_PROMPTS[:1], PAIR_COMPLETIONS[:1], PAIR_SCORES[:1], mode="all_pairs",
                               soft_labels=True, preferences=preferences[:1])
    assert [(r.where, r.completions, r.preference_prob) for r in records] == [
        ("online#p0[0>3]", ["a", "d"], 0.5), ("online#p0[0>1]", ["a", "b"], 0.7), ("online#p0[1>3]", ["b", "d"], 0.9)]


def test_uncertainty_filter_and_identical_texts():
    completions, scores = [["a", "b", "c", "d", "e"]], [[10.0, 5.0, 0.8, 0.0, 1.0]]
    spread = [[3.0, 4.0, 0.5, 0.5, math.nan]]  # e: unknown uncertainty, dropped
    # Thresholds z sqrt(sd_i^2 + sd_j^2): a>b 5 (gap 5: dropped, <=), a>c, a>d 3.04, b>c, b>d 4.03, c>d 0.71 (gap 0.8).
    records, stats = build_records(["p"], completions, scores, mode="all_pairs", spread=spread)
    assert [r.where for r in records] == ["online#p0[0>2]", "online#p0[0>3]", "online#p0[1>2]", "online#p0[1>3]",
                                          "online#p0[2>3]"]
    assert (stats["dropped_nan"], stats["candidate_pairs"], stats["dropped_uncertain"]) == (1, 6, 1)
    records, stats = build_records(["p"], completions, scores, mode="all_pairs", spread=spread, uncertainty_z=2.0)
    assert [r.where for r in records] == ["online#p0[0>2]", "online#p0[0>3]"]
    assert stats["dropped_uncertain"] == 4

    records, stats = build_records(["p"], [["x", "x", "y"]], [[1.0, 0.0, 0.5]], mode="all_pairs")
    assert [r.where for r in records] == ["online#p0[0>2]", "online#p0[2>1]"] and stats["dropped_identical"] == 1


def two_sided_certainty(d, u):
    """2 Phi(d / u) - 1, by the statistics module: the weight the docstring of pairing defines."""
    return 2 * statistics.NormalDist().cdf(d / u) - 1 if u else float(d > 0)


def test_pairwise_uncertainty_filter_and_weights():
    """A pairwise judge's pairs: dropped when P(i beats j) lies within z standard errors of 1/2 (the boundary
    included), weighted by 2 Phi(d / se) - 1, d = P - 1/2, once oriented by the comparison."""
    nan = math.nan
    upper = {(0, 1): (0.875, 0.125),   # d 0.375 > 2 * 0.125: kept
             (0, 2): (0.75, 0.125),    # d 0.25 = 2 * 0.125: dropped
             (0, 3): (0.25, 0.0625),   # 3 beats 0: d 0.25 > 0.125, kept as 3 > 0
             (1, 2): (0.5, 0.0),       # a sure tie: d 0 <= 0, dropped
             (1, 3): (nan, nan),       # the judge failed
             (2, 3): (0.625, 0.0)}     # sure: kept, weight 1
    preferences = torch.full((1, 4, 4), 0.5, dtype=torch.float64)
    spread = torch.zeros((1, 4, 4), dtype=torch.float64)
    for (i, j), (p, se) in upper.items():
        preferences[0, i, j], preferences[0, j, i], spread[0, i, j], spread[0, j, i] = p, 1 - p, se, se
    scores = [[4.0, 3.0, 2.0, 1.0]]  # all six pairs are candidates
    options = dict(mode="all_pairs", preferences=preferences, spread=spread)

    records, stats = build_records(["p"], [["a", "b", "c", "d"]], scores, uncertainty_z=2.0, **options)
    assert [(r.where, r.weight) for r in records] == [("online#p0[0>1]", None), ("online#p0[3>0]", None),
                                                      ("online#p0[2>3]", None)]
    assert (stats["candidate_pairs"], stats["dropped_uncertain"], stats["dropped_nan_pairs"], stats["pairs"]) == (
        6, 2, 1, 3)

    records, stats = build_records(["p"], [["a", "b", "c", "d"]], scores, uncertainty_z=2.0,
                                   uncertainty_weighting=True, **options)
    assert [r.where for r in records] == ["online#p0[0>1]", "online#p0[3>0]", "online#p0[2>3]"]
    assert [r.weight for r in records] == pytest.approx(
        [two_sided_certainty(0.375, 0.125), two_sided_certainty(0.25, 0.0625), 1.0], rel=1e-12)
    # Weights alone (no filter): every judged pair is kept, a sure tie weighs 0.
    records, stats = build_records(["p"], [["a", "b", "c", "d"]], scores, uncertainty_z=None,
                                   uncertainty_weighting=True, **options)
    assert [r.where for r in records] == ["online#p0[0>1]", "online#p0[0>2]", "online#p0[3>0]", "online#p0[1>2]",
                                          "online#p0[2>3]"]
    assert [r.weight for r in records] == pytest.approx([
        two_sided_certainty(0.375, 0.125), two_sided_certainty(0.25, 0.125), two_sided_certainty(0.25, 0.0625),
        0.0, 1.0], rel=1e-12)
    assert (stats["dropped_uncertain"], stats["dropped_nan_pairs"]) == (0, 1)


def test_scalar_uncertainty_weights():
    """A scalar judge's pairs weigh 2 Phi(gap / sqrt(sd_i^2 + sd_j^2)) - 1."""
    scores, spread = [[10.0, 5.0, 0.8]], [[3.0, 4.0, 0.5]]
    records, _ = build_records(["p"], [["a", "b", "c"]], scores, mode="all_pairs", spread=spread,
                               uncertainty_z=None, uncertainty_weighting=True)
    assert [r.where for r in records] == ["online#p0[0>1]", "online#p0[0>2]", "online#p0[1>2]"]
    assert [r.weight for r in records] == pytest.approx([two_sided_certainty(5.0, 5.0),
                                                         two_sided_certainty(9.2, math.sqrt(9.25)),
                                                         two_sided_certainty(4.2, math.sqrt(16.25))], rel=1e-12)


def test_pairing_rejects_bad_input():
    with pytest.raises(ValueError, match="mode must be one of best_worst, all_pairs, margin, ranked"):
        build_records(PAIR_PROMPTS, PAIR_COMPLETIONS, PAIR_SCORES, mode="best")
    with pytest.raises(ValueError, match="ranked"):
        build_records(PAIR_PROMPTS, PAIR_COMPLETIONS, PAIR_SCORES, mode="ranked", spread=torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"scores must have shape \[3, 4\]"):
        build_records(PAIR_PROMPTS, PAIR_COMPLETIONS, [[1.0, 2.0]])
    with pytest.raises(ValueError, match="uncertainty_weighting .* pass its spread"):
        build_records(PAIR_PROMPTS, PAIR_COMPLETIONS, PAIR_SCORES, uncertainty_weighting=True)
    # A pairwise judge's spread is per pair.
    with pytest.raises(ValueError, match=r"spread must have shape \[3, 4, 4\] \(prompts x completions x completions\)"):
        build_records(PAIR_PROMPTS, PAIR_COMPLETIONS, PAIR_SCORES, preferences=torch.zeros(3, 4, 4),
                      spread=torch.zeros(3, 4))
