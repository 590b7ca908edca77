"""The bundled preference task: single-digit sums, with a ground-truth scorer.

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

import random

import torch


class Addition:
    name = "addition"
    alphabet = "0123456789+="
    answers = 10  # the digits

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

    @torch.no_grad()
    def win_rate(self, model, tokenizer, *, samples: int, temperature: float, seed: int, device) -> float:
        """Fraction of sampled answers (one token per random prompt) the scorer judges correct."""
        rng = random.Random(f"{self.name}-eval-{seed}")
        prompts = [self.prompt(*self._operands(rng)) for _ in range(samples)]
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
                                    temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=1,
                                    pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        model.train(was_training)
        completions = [tokenizer.decode(row, skip_special_tokens=True) for row in output[:, width:].tolist()]
        return sum(map(self.is_correct, prompts, completions)) / samples


TASKS = {Addition.name: Addition()}
