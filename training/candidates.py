"""DNO's extra candidates: teacher or gold completions judged beside each prompt's own samples.

Direct Nash Optimization (Rosset et al. 2024, "Direct Nash Optimization: Teaching Language Models to
Self-Improve with General Preferences", arXiv:2404.03715), its practical algorithm: each round, every
prompt's K samples from the current policy are joined by the output of a stronger teacher (GPT-4 in the
paper), the preference oracle ranks them all, the pairs with a large margin train a DPO-style contrastive
loss against the policy at the round's start, so a pair may hold the teacher's answer as winner (or, once
the policy beats it, as loser). Here (online section, config.ONLINE_KEYS):
  teacher          a local causal-LM directory (transformers' AutoModelForCausalLM) sharing the policy's
                   vocabulary; teacher_samples completions per prompt, sampled like the policy's
  gold             reference completions: a .jsonl of {"prompt", "completion"} rows (every round prompt
                   needs one; a prompt with several gets all of them), or "task", the synthetic task's answer
A gold completion trains on its text encoded by the policy's tokenizer, then EOS (a finished answer);
a teacher's on the ids it sampled. The recipe is training/configs/dno.yaml.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import transformers

from . import data as D
from . import sampling


class CandidateError(ValueError):
    pass


def _gold_table(source: str) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for where, row in D.read_rows(source, kind="sft", size=0, seed=0):
        prompt, completion = D._require(where, row, "prompt"), D._require(where, row, "completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise CandidateError(f"{where}: online.gold rows hold a text prompt and completion")
        table.setdefault(prompt, []).append(completion)
    if not table:
        raise CandidateError(f"online.gold {source}: no rows")
    return table


class Candidates:
    """The teacher and gold completions of the online section; add() joins them to a batch of samples."""

    def __init__(self, options: dict, tokenizer, *, task=None, device="cpu", vocab_size: int | None = None):
        self.tokenizer, self.device = tokenizer, device
        self.teacher_samples = options["teacher_samples"]
        self.teacher = None
        if options["teacher"] is not None:
            path = Path(options["teacher"])
            if not path.is_dir():
                raise CandidateError(f"online.teacher {path}: not a directory holding a causal LM")
            self.teacher = transformers.AutoModelForCausalLM.from_pretrained(path).to(device).eval()
            self.teacher.requires_grad_(False)
            if vocab_size is not None and self.teacher.config.vocab_size != vocab_size:
                raise CandidateError(f"online.teacher {path}: vocabulary of {self.teacher.config.vocab_size} tokens; "
                                     f"the policy's has {vocab_size} (the teacher samples ids the policy trains on)")
        gold = options["gold"]
        if gold == "task":
            if task is None or not hasattr(task, "answer"):
                raise CandidateError("online.gold task takes the synthetic task's answer: use a task that has one "
                                     "(synthetic:sort), or a .jsonl of prompt/completion rows")
            self.gold = lambda prompt: [task.answer(prompt)]
        elif gold is not None:
            table = _gold_table(gold)

            def lookup(prompt):
                if prompt not in table:
                    raise CandidateError(f"online.gold {gold}: no completion for the prompt {prompt!r} (every prompt "
                                         "of a round needs one)")
                return table[prompt]
            self.gold = lookup
        else:
            self.gold = None

    @property
    def active(self) -> bool:
        return self.teacher is not None or self.gold is not None

    def add(self, samples: sampling.Samples, *, seed: int, max_new_tokens: int, temperature: float, top_p: float,
            batch_size: int) -> sampling.Samples:
        """`samples` with each prompt's teacher and gold completions appended after its own (the same number
        for every prompt: the judges compare rectangular batches)."""
        extra_text = [[] for _ in samples.prompts]
        extra_ids = [[] for _ in samples.prompts]
        if self.teacher is not None:
            taught = sampling.sample(self.teacher, self.tokenizer, samples.prompts, k=self.teacher_samples,
                                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                     device=self.device, batch_size=batch_size, progress=False)
            for p in range(len(samples.prompts)):
                extra_text[p] += taught.completions[p]
                extra_ids[p] += taught.completion_ids[p]
        if self.gold is not None:
            eos = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
            golds = [self.gold(prompt) for prompt in samples.prompts]
            if len({len(each) for each in golds}) > 1:
                raise CandidateError("online.gold: every prompt of a round needs the same number of gold "
                                     f"completions (the judge compares K + gold per prompt); got {golds}")
            for p, each in enumerate(golds):
                extra_text[p] += each
                extra_ids[p] += [self.tokenizer.encode(text, add_special_tokens=False) + eos for text in each]
        return dataclasses.replace(
            samples, completions=[own + more for own, more in zip(samples.completions, extra_text)],
            completion_ids=[own + more for own, more in zip(samples.completion_ids, extra_ids)])
