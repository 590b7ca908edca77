"""The bundled preference tasks, each with a ground-truth scorer.

addition (the default job): single-digit sums, one-token answers.
sort (the online job): sort four digits, multi-token answers ending in EOS.

addition:

Prompts look like "3+5=" with a + b <= 9, completions are one digit. The SFT
rows carry uniformly random digits, so SFT teaches the format but not the sums
and the policy starts DPO at chance (1/10). The preference rows pair the true
sum (chosen) with a wrong digit (rejected), so only DPO can teach the task. The
scorer then measures how often sampled completions are correct.

Answers are one token on purpose: when answers differ in length or share
leading tokens, DPO on a model this small learns to push probability off the
shared structure (the end of sequence, a tens digit) rather than onto the
right answer, and sampled completions degrade.
"""
from __future__ import annotations

import math
import random

import torch


class Addition:
    name = "addition"
    alphabet = "0123456789+="
    answers = 10  # the digits
    max_new_tokens = 1

    @property
    def chance(self) -> float:
        return 1 / self.answers

    def _operands(self, rng: random.Random) -> tuple[int, int]:
        # Every answer equally likely: a skewed answer marginal is the first thing DPO would learn.
        total = rng.randint(0, self.answers - 1)
        a = rng.randint(0, total)
        return a, total - a

    def prompt(self, a: int, b: int) -> str:
        return f"{a}+{b}="

    def _wrong_answer(self, rng: random.Random, total: int) -> int:
        answer = rng.randint(0, self.answers - 2)
        return answer + 1 if answer >= total else answer  # uniform over the wrong digits

    def score(self, prompt: str, completion: str) -> int:
        """Ground-truth quality: 0 for the sum, minus the distance from it otherwise."""
        a, b = (int(x) for x in prompt.rstrip("=").split("+"))
        return -abs(int(completion) - (a + b))

    def rows(self, kind: str, n: int, seed: int, list_size: int = 4) -> list[dict]:
        """`n` rows of kind "preference" (prompt/chosen/rejected), "ranked" (prompt/completions/scores,
        `list_size` candidates) or "sft" (prompt/completion)."""
        if kind == "ranked" and not 2 <= list_size <= self.answers:
            raise ValueError(f"list_size must lie in [2, {self.answers}] for the {self.name} task; got {list_size}")
        rng = random.Random(f"{self.name}-{kind}-{seed}")
        rows = []
        for _ in range(n):
            a, b = self._operands(rng)
            if kind == "ranked":
                prompt = self.prompt(a, b)
                wrong = rng.sample([d for d in range(self.answers) if d != a + b], list_size - 1)
                completions = [str(d) for d in rng.sample([a + b, *wrong], list_size)]
                rows.append({"prompt": prompt, "completions": completions,
                             "scores": [self.score(prompt, c) for c in completions]})
            elif kind == "preference":
                rows.append({"prompt": self.prompt(a, b), "chosen": str(a + b),
                             "rejected": str(self._wrong_answer(rng, a + b))})
            else:
                rows.append({"prompt": self.prompt(a, b), "completion": str(rng.randint(0, self.answers - 1))})
        return rows

    def is_correct(self, prompt: str, completion: str) -> bool:
        a, b = (int(x) for x in prompt.rstrip("=").split("+"))
        return completion.strip() == str(a + b)

    def prompts(self, n: int, seed: int | str) -> list[str]:
        rng = random.Random(f"{self.name}-{seed}")
        return [self.prompt(*self._operands(rng)) for _ in range(n)]

    def win_rate(self, model, tokenizer, *, samples: int, temperature: float, seed: int, device) -> float:
        """Fraction of sampled answers (one per random prompt) the scorer judges correct."""
        return sampled_accuracy(self, model, tokenizer, samples=samples, temperature=temperature, seed=seed,
                                device=device)


class Sorting:
    """Sort four digits: "3142=" -> "1234", then EOS. The online job's task.

    The SFT rows are right only sometimes (sft_correct of them sorted, the rest a random
    order of the same digits), so the SFT policy's own samples hold both winners and
    losers: what online preference learning needs. The score is graded (digits in the
    right place, minus any length error), so pairs can be ranked; a sample is correct
    when it is exactly the sorted digits.
    """
    name = "sort"
    alphabet = "0123456789="
    length = 4
    sft_correct = 0.25
    max_new_tokens = length + 1  # the digits and EOS

    @property
    def chance(self) -> float:
        return self.sft_correct

    def _digits(self, rng: random.Random) -> str:
        return "".join(rng.choice("0123456789") for _ in range(self.length))

    def prompt(self, digits: str) -> str:
        return f"{digits}="

    def answer(self, prompt: str) -> str:
        return "".join(sorted(prompt.rstrip("=")))

    def _shuffled(self, rng: random.Random, prompt: str) -> str:
        """The prompt's digits in a random order other than sorted (the sorted order when all digits are equal)."""
        digits, answer = list(prompt.rstrip("=")), self.answer(prompt)
        for _ in range(16):
            rng.shuffle(digits)
            if "".join(digits) != answer:
                break
        return "".join(digits)

    def score(self, prompt: str, completion: str) -> int:
        answer = self.answer(prompt)
        return sum(a == b for a, b in zip(answer, completion)) - abs(len(completion) - len(answer))

    def is_correct(self, prompt: str, completion: str) -> bool:
        return completion == self.answer(prompt)

    def prompts(self, n: int, seed: int | str) -> list[str]:
        rng = random.Random(f"{self.name}-{seed}")
        return [self.prompt(self._digits(rng)) for _ in range(n)]

    def rows(self, kind: str, n: int, seed: int, list_size: int = 4) -> list[dict]:
        """`n` rows of kind "preference" (sorted vs another order), "ranked" (`list_size` orders, scored)
        or "sft" (sorted with probability sft_correct, else another order)."""
        rng = random.Random(f"{self.name}-{kind}-{seed}")
        rows = []
        for prompt in self.prompts(n, f"rows-{kind}-{seed}"):
            answer = self.answer(prompt)
            if kind == "ranked":
                completions = [answer] + [self._shuffled(rng, prompt) for _ in range(list_size - 1)]
                rng.shuffle(completions)
                rows.append({"prompt": prompt, "completions": completions,
                             "scores": [self.score(prompt, c) for c in completions]})
            elif kind == "preference":
                rows.append({"prompt": prompt, "chosen": answer, "rejected": self._shuffled(rng, prompt)})
            else:
                completion = answer if rng.random() < self.sft_correct else self._shuffled(rng, prompt)
                rows.append({"prompt": prompt, "completion": completion})
        return rows

    def win_rate(self, model, tokenizer, *, samples: int, temperature: float, seed: int, device) -> float:
        """Fraction of sampled answers (one per random prompt) that are exactly the sorted digits."""
        return sampled_accuracy(self, model, tokenizer, samples=samples, temperature=temperature, seed=seed,
                                device=device)


@torch.no_grad()
def sampled_accuracy(task, model, tokenizer, *, samples: int, temperature: float, seed: int, device) -> float:
    """Fraction of answers sampled (one per prompt, on `samples` prompts of the eval seed) the task judges correct."""
    prompts = task.prompts(samples, f"eval-{seed}")
    encoded = [tokenizer.encode(p) for p in prompts]
    width = max(map(len, encoded))
    # Left padding keeps every prompt's last token at the same position for generation.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    was_training = model.training
    model.eval()
    # Sampling must not disturb the training RNG, or a resumed run would diverge.
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                temperature=temperature, top_k=0, top_p=1.0,
                                max_new_tokens=task.max_new_tokens,
                                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    completions = [tokenizer.decode(row, skip_special_tokens=True) for row in output[:, width:].tolist()]
    return sum(map(task.is_correct, prompts, completions)) / samples


TASKS = {task.name: task for task in (Addition(), Sorting())}


def sort_preference(prompts, completions_a, completions_b) -> list[float]:
    """A pairwise judge of the sort task, Bradley-Terry on its score: P(a beats b) = sigmoid(score(a) - score(b)).

    As `online.judge: pairwise:prefops.training.synthetic:sort_preference` it stands in for a preference
    model in the bundled DNO recipe (training/configs/dno.yaml), which needs no download."""
    task = TASKS["sort"]
    return [1 / (1 + math.exp(task.score(p, b) - task.score(p, a))) for p, a, b in zip(prompts, completions_a,
                                                                                      completions_b)]
