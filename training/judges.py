"""Judges for online preference learning: score sampled completions, or compare them in pairs.

make_judge(spec) builds one from a string:
  "task"                      the synthetic task's ground-truth scorer, task.score(prompt, completion)
  "module:function"           function(prompts, completions) -> one number per completion (flattened lists)
  "reward_model:PATH"         a local AutoModelForSequenceClassification with one label: the logit of
                              prompt + completion
  "pairwise:module:function"  function(prompts, completions_a, completions_b) -> P(a beats b) per pair
  "self"                      the policy being trained judges its own samples (SelfPreferringJudge, OSP)
  [spec, spec, ...]           an Ensemble of scalar judges: their mean, and their spread for the
                              uncertainty filter; of pairwise judges, a PairwiseEnsemble: each pair's
                              mean P(a beats b) over the members and its standard error

Scores are [P, K] float64, preferences [P, K, K] with P(i beats j); NaN marks what the
judge failed on. A judge that raises on a batch is asked again one sample at a time; a
sample that raises, or returns NaN, inf or something that is not a number, becomes NaN
and is counted in `failed`, so a flaky judge neither stops the run nor puts garbage in
the training data. A return of the wrong length is a bug of the judge and an error.
"""
from __future__ import annotations

import importlib
import math
import numbers
from pathlib import Path

import torch

from .sampling import left_padded


class JudgeError(ValueError):
    pass


def _number(value) -> float:
    """The value as a finite float, NaN for anything else (a string, None, inf)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


def _rectangular(prompts: list, completions: list) -> int:
    """K, the completions per prompt, after checking every prompt has K."""
    if len(prompts) != len(completions) or not prompts:
        raise JudgeError(f"judging needs one list of completions per prompt; got {len(prompts)} prompts and "
                         f"{len(completions)} lists")
    sizes = {len(group) for group in completions}
    if len(sizes) != 1 or 0 in sizes:
        raise JudgeError(f"every prompt needs the same, non-zero number of completions; got {sorted(sizes)}")
    return sizes.pop()


class Judge:
    """Scores completions; preferences() compares the completions of each prompt.

    calls: completions (pairs for a pairwise judge) judged so far, the judge budget;
    failed: how many of them came back NaN; last_error: the latest exception, for the log."""
    pairwise: bool = False
    calls: int = 0
    failed: int = 0
    last_error: str | None = None

    def __init__(self, name: str):
        self.name = name

    def _judge(self, columns: list[list], *, low: float = -math.inf, high: float = math.inf) -> torch.Tensor:
        """self._call(*columns), one value per row of the columns; values outside [low, high] become NaN."""
        rows = len(columns[0])
        try:
            values = self._values(self._call(*columns), rows)
        except JudgeError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure of the judge: retry sample by sample
            self.last_error = f"{type(error).__name__}: {error}"
            values = [self._one(column[i] for column in columns) for i in range(rows)]
        result = torch.tensor(values, dtype=torch.float64)
        result[(result < low) | (result > high)] = math.nan
        self.calls += rows
        self.failed += int(result.isnan().sum())
        return result

    def _one(self, row) -> float:
        try:
            return self._values(self._call(*[[value] for value in row]), 1)[0]
        except JudgeError:
            raise
        except Exception as error:  # noqa: BLE001 - this sample failed: it becomes NaN
            self.last_error = f"{type(error).__name__}: {error}"
            return math.nan

    def _values(self, returned, rows: int) -> list[float]:
        if isinstance(returned, torch.Tensor):
            returned = returned.reshape(-1).tolist()
        try:
            values = list(returned)
        except TypeError:
            raise JudgeError(f"judge {self.name!r} returned {type(returned).__name__}, expected a list of "
                             f"{rows} numbers") from None
        if len(values) != rows:
            raise JudgeError(f"judge {self.name!r} returned {len(values)} values for {rows} "
                             f"{'pairs' if self.pairwise else 'completions'}")
        return [_number(value) for value in values]

    def _call(self, *columns) -> list:
        raise NotImplementedError

    def scores(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        """[P, K] float64 scores, larger is better; NaN where the judge failed."""
        k = _rectangular(prompts, completions)
        flat = self._judge([[prompt for prompt in prompts for _ in range(k)],
                            [completion for group in completions for completion in group]])
        return flat.view(len(prompts), k)

    def scores_with_spread(self, prompts: list[str], completions: list[list[str]]):
        """(scores [P, K], their uncertainty [P, K] or None when the judge has no measure of it)."""
        return self.scores(prompts, completions), None

    def preferences(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        """[P, K, K] P(completion i beats completion j): 1[s_i > s_j] + 1/2 1[s_i = s_j], NaN where a score is."""
        return scalar_preferences(self.scores(prompts, completions))


def scalar_preferences(scores: torch.Tensor) -> torch.Tensor:
    s_i, s_j = scores[:, :, None], scores[:, None, :]
    result = (s_i > s_j).double() + 0.5 * (s_i == s_j).double()
    result[s_i.isnan() | s_j.isnan()] = math.nan
    return result


def mean_win_probability(preferences: torch.Tensor) -> torch.Tensor:
    """[P, K] mean over j != i of P(i beats j), over the comparisons that did not fail (NaN where all did):
    a failed comparison leaves both completions ranked against their other opponents, not dropped."""
    others = preferences.clone()
    others.diagonal(dim1=1, dim2=2).fill_(math.nan)
    return others.nanmean(dim=2)


class FunctionJudge(Judge):
    def __init__(self, name: str, function):
        super().__init__(name)
        self.function = function

    def _call(self, *columns) -> list:
        return self.function(*columns)


class TaskJudge(Judge):
    """The synthetic task's scorer: a completion it cannot parse raises there, and becomes NaN here."""

    def __init__(self, task):
        super().__init__(f"task:{getattr(task, 'name', type(task).__name__)}")
        self.task = task

    def _call(self, prompts, completions) -> list:
        return [self.task.score(prompt, completion) for prompt, completion in zip(prompts, completions)]


class RewardModelJudge(Judge):
    """The single logit of a sequence-classification model on prompt + completion, batched, without grad."""

    def __init__(self, path: str, device="cpu", batch_size: int = 16, max_length: int | None = None):
        super().__init__(f"reward_model:{path}")
        import transformers

        if not Path(path).is_dir():
            raise JudgeError(f"judge {self.name!r}: {path} is not a directory holding a model and its tokenizer")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.model = transformers.AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        if self.model.config.num_labels != 1:
            raise JudgeError(f"judge {self.name!r}: a reward model has one label (its score); this model has "
                             f"{self.model.config.num_labels}")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The model reads its score at the last token that is not padding: it must know the pad id.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    @torch.no_grad()
    def _call(self, prompts, completions) -> list:
        texts = [prompt + completion for prompt, completion in zip(prompts, completions)]
        values = []
        for first in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(texts[first:first + self.batch_size], return_tensors="pt", padding=True,
                                    truncation=self.max_length is not None, max_length=self.max_length)
            values += self.model(**inputs.to(self.device)).logits[:, 0].double().tolist()
        return values


class Pairwise:
    """What pairwise judges share (first in the bases, so its scores replace Judge's): they judge preferences;
    a completion's score is its mean win probability against the prompt's other completions."""
    pairwise = True

    def preferences_with_spread(self, prompts: list[str], completions: list[list[str]]):
        """(preferences [P, K, K], the standard error of each or None when the judge has no measure of it)."""
        return self.preferences(prompts, completions), None

    def scores(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        if _rectangular(prompts, completions) < 2:
            raise JudgeError(f"judge {self.name!r} compares completions: it needs at least 2 per prompt")
        return mean_win_probability(self.preferences(prompts, completions))


class PairwiseJudge(Pairwise, FunctionJudge):
    """function(prompts, completions_a, completions_b) -> P(a beats b); each unordered pair is asked once."""

    def preferences(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        k = _rectangular(prompts, completions)
        pairs = [(p, i, j) for p in range(len(prompts)) for i in range(k) for j in range(i + 1, k)]
        result = torch.full((len(prompts), k, k), 0.5, dtype=torch.float64)
        if pairs:
            won = self._judge([[prompts[p] for p, _, _ in pairs], [completions[p][i] for p, i, _ in pairs],
                               [completions[p][j] for p, _, j in pairs]], low=0.0, high=1.0)
            p, i, j = (torch.tensor(index) for index in zip(*pairs))
            result[p, i, j], result[p, j, i] = won, 1 - won
        return result


class SelfPreferringJudge(Pairwise, Judge):
    """OSP's self-judgement: the current policy compares two of its own completions.

    Online Self-Preferring Language Models (Zhai et al. 2024, arXiv:2405.14103): the model judges its own
    samples, and the strength of its preference is trained on with a soft-preference cross-entropy (here
    online.soft_labels with a soft-label loss, e.g. sigmoid: -p log σ(βh) - (1 - p) log σ(-βh)). For a pair
    (a, b) the comparison prompt is `template` with {prompt}, {a}, {b} filled in, and the model's next-token
    logits z of the two answer tokens (answers[0] names the first response, answers[1] the second) give
        P(a beats b) = ½ [σ(z_first - z_second | a first) + σ(z_second - z_first | b first)],
    both orders averaged (our choice: it cancels the position bias of one order, and P(a ≻ b) + P(b ≻ a) = 1
    exactly). `model` is set by the online loop before each judgement (the policy now, a local copy under
    torchrun); the tokenizer is the policy's. Each answer must be one token of its vocabulary."""

    def __init__(self, tokenizer, *, template: str, answers, device="cpu", batch_size: int = 16):
        super().__init__("self")
        for field in ("{prompt}", "{a}", "{b}"):
            if field not in template:
                raise JudgeError(f"judge 'self': the comparison template must hold {{prompt}}, {{a}} and {{b}}; "
                                 f"{field} is missing from {template!r}")
        self.tokenizer, self.template, self.device, self.batch_size = tokenizer, template, device, batch_size
        self.answer_ids = [self._one_token(answer) for answer in answers]
        self.model = None

    def _one_token(self, answer: str) -> int:
        ids = self.tokenizer.encode(answer, add_special_tokens=False)
        unknown = getattr(self.tokenizer, "unk_token_id", None)
        if len(ids) != 1 or ids[0] == unknown:
            raise JudgeError(f"judge 'self': answer {answer!r} must be one token of the policy's vocabulary; it "
                             f"encodes to {ids}")
        return ids[0]

    @torch.no_grad()
    def first_preferred(self, texts: list[str]) -> torch.Tensor:
        """σ(z_first - z_second) at the end of each comparison text, float64."""
        if self.model is None:
            raise JudgeError("judge 'self' judges with the policy: the online loop sets its model")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        training, out = self.model.training, []
        self.model.eval()
        try:
            for first in range(0, len(texts), self.batch_size):
                input_ids, mask = left_padded(self.tokenizer, texts[first:first + self.batch_size], pad, self.device)
                positions = (mask.cumsum(-1) - 1).clamp_min(0)
                logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[:, -1]
                chosen = logits[:, self.answer_ids].double()
                out.append(torch.sigmoid(chosen[:, 0] - chosen[:, 1]).cpu())
        finally:
            self.model.train(training)
        return torch.cat(out)

    def _call(self, prompts, completions_a, completions_b) -> list:
        fill = lambda p, a, b: self.template.format(prompt=p, a=a, b=b)  # noqa: E731
        rows = list(zip(prompts, completions_a, completions_b))
        a_first = self.first_preferred([fill(p, a, b) for p, a, b in rows])
        b_first = self.first_preferred([fill(p, b, a) for p, a, b in rows])
        return (0.5 * (a_first + (1 - b_first))).tolist()

    preferences = PairwiseJudge.preferences


class Ensemble(Judge):
    """The mean of its members' scores, with their spread (std over members) as the uncertainty.

    A completion any member failed on is NaN: members score on their own scales, so a mean of
    the others would not be comparable with the rest."""

    def __init__(self, judges: list[Judge]):
        if len(judges) < 2:
            raise JudgeError(f"an ensemble needs at least 2 judges; got {len(judges)}")
        super().__init__("ensemble(" + ", ".join(judge.name for judge in judges) + ")")
        self.judges = judges
        self._calls = self._failed = 0

    # The members count their own calls; a resumed run sets the totals, kept as an offset over the members'.
    @property
    def calls(self) -> int:
        return self._calls + sum(judge.calls for judge in self.judges)

    @calls.setter
    def calls(self, value: int):
        self._calls = value - sum(judge.calls for judge in self.judges)

    @property
    def failed(self) -> int:
        return self._failed + sum(judge.failed for judge in self.judges)

    @failed.setter
    def failed(self, value: int):
        self._failed = value - sum(judge.failed for judge in self.judges)

    def scores_with_spread(self, prompts: list[str], completions: list[list[str]]):
        members = torch.stack([judge.scores(prompts, completions) for judge in self.judges])
        return members.mean(dim=0), members.std(dim=0)

    def scores(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        return self.scores_with_spread(prompts, completions)[0]


class PairwiseEnsemble(Pairwise, Ensemble):
    """Each pair's mean P(a beats b) over the members that did not fail on it, with its standard error
    std / sqrt(n): unlike scores, probabilities share one scale, so the members that answered still give
    one. NaN where fewer than 2 answered (no standard error)."""

    def preferences_with_spread(self, prompts: list[str], completions: list[list[str]]):
        return _mean_and_standard_error(torch.stack([judge.preferences(prompts, completions) for judge in self.judges]))

    def preferences(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        return self.preferences_with_spread(prompts, completions)[0]


def _mean_and_std(runs: torch.Tensor):
    """(mean, sample std, count) over dim 0 of the values that are not NaN; mean and std NaN where fewer than
    2 are (a spread needs two)."""
    valid = ~runs.isnan()
    count = valid.sum(dim=0)
    mean = runs.nan_to_num().sum(dim=0) / count
    var = ((runs - mean).nan_to_num() ** 2).sum(dim=0) / (count - 1)
    too_few = count < 2
    return mean.masked_fill(too_few, math.nan), var.sqrt().masked_fill(too_few, math.nan), count


def _mean_and_standard_error(runs: torch.Tensor):
    mean, std, count = _mean_and_std(runs)
    return mean, std / count.double().sqrt()  # an integer tensor's sqrt would be float32


def _check_repeats(repeats) -> None:
    if not isinstance(repeats, int) or repeats < 2:
        raise ValueError(f"repeats must be an integer >= 2 (a spread needs two judgements); got {repeats!r}")


def repeat_scores(judge: Judge, prompts: list[str], completions: list[list[str]], repeats: int):
    """(mean [P, K], std [P, K]) of `repeats` scorings by a stochastic judge: the uncertainty of one scoring
    (the mean's is std / sqrt(repeats)). Failed repeats are left out (they are draws of the same judge);
    NaN where fewer than 2 succeeded."""
    _check_repeats(repeats)
    return _mean_and_std(torch.stack([judge.scores(prompts, completions) for _ in range(repeats)]))[:2]


def repeat_preferences(judge: Pairwise, prompts: list[str], completions: list[list[str]], repeats: int):
    """(mean [P, K, K], standard error [P, K, K]) of `repeats` judgements of every pair by a stochastic pairwise
    judge (each unordered pair is asked `repeats` times), e.g. an estimator with MC dropout as in UPO. Failed
    repeats are left out; NaN where fewer than 2 succeeded."""
    _check_repeats(repeats)
    return _mean_and_standard_error(torch.stack([judge.preferences(prompts, completions) for _ in range(repeats)]))


def _function(spec: str, reference: str):
    module_name, _, function_name = reference.partition(":")
    if not module_name or not function_name:
        raise JudgeError(f"judge {spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise JudgeError(f"judge {spec!r}: cannot import module {module_name!r} ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise JudgeError(f"judge {spec!r}: module {module_name!r} has no function {function_name!r}")
    return function


def make_judge(spec: str | list, *, task=None, device="cpu", batch_size: int = 16, self_judge=None) -> Judge:
    """A judge from its spec (see the module docstring); `task` is the synthetic task for "task"; self_judge
    SelfPreferringJudge's arguments for "self" (tokenizer, template, answers)."""
    if isinstance(spec, list):
        if "self" in spec:
            raise JudgeError("judge 'self' judges alone: an ensemble averages independent judges")
        members = [make_judge(each, task=task, device=device, batch_size=batch_size) for each in spec]
        pairwise = {member.pairwise for member in members}
        if len(pairwise) > 1:
            raise JudgeError(f"judge {spec!r}: an ensemble averages scores or, of pairwise judges, preferences; "
                             "its members must be all scalar or all pairwise")
        return PairwiseEnsemble(members) if pairwise.pop() else Ensemble(members)
    if spec == "task":
        if task is None:
            raise JudgeError("judge 'task' scores with the synthetic task's scorer: pass task=")
        return TaskJudge(task)
    if spec == "self":
        if self_judge is None:
            raise JudgeError("judge 'self' judges with the policy: pass self_judge= (its tokenizer, template, answers)")
        return SelfPreferringJudge(device=device, batch_size=batch_size, **self_judge)
    if spec.startswith("reward_model:"):
        return RewardModelJudge(spec.split(":", 1)[1], device=device, batch_size=batch_size)
    if spec.startswith("pairwise:"):
        return PairwiseJudge(spec, _function(spec, spec.split(":", 1)[1]))
    if ":" in spec:
        return FunctionJudge(spec, _function(spec, spec))
    raise JudgeError(f"judge {spec!r}: expected one of task, self, module:function, reward_model:PATH, "
                     "pairwise:module:function")
