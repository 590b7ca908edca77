"""MCTS-DPO's step-level pairs: a small tree of reasoning steps per prompt, valued by its leaves, siblings paired.

Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning (Xie et al. 2024, arXiv:2405.00451)
collects step-level preferences: at a node (the prompt and the steps so far) the candidate next steps are
valued by the search, and the highest- and lowest-valued siblings form a DPO pair whose prompt is the shared
prefix. Here, per prompt (online.tree_depth > 0, config.ONLINE_KEYS):
  1. expand: from the prompt, sample tree_branching next steps; a step ends at the step_boundary token (a
     newline by default; included in the step) or after step_max_tokens tokens, or at EOS (a finished
     answer, not expanded further). Repeat for every unfinished node until tree_depth steps;
  2. roll out: each unfinished node at tree_depth is completed by one sample to the end of the answer
     (max_new_tokens); the finished nodes are their own leaves;
  3. score the leaves, prompt + the whole path, with the judge (a pairwise judge: each leaf's mean win
     probability against the prompt's other leaves);
  4. back up: a node's value is the mean of its leaves' scores (the Monte Carlo estimate of its expected
     outcome); at every node whose children's values differ, the best child's step against the worst's is a
     pair with prompt = the prompt and the steps above them.
Our reading: the paper selects nodes with UCT (PUCT), values them from outcome and the model's own stepwise
self-evaluation, and expands over many simulations; this is the full tree of branching B and depth D with one
rollout per leaf and outcome-only values: the same pairs (siblings under a shared prefix, ranked by value) from
a fixed budget of B + B^2 + ... + B^D step samples and at most B^D rollouts per prompt. The pairs train on the
sampled token ids of their steps (EOS only where sampled); the prefix is the text of the steps above, encoded
again as the prompt. With shared_prompt: true each pair's prompt, the shared prefix, is run once.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from . import sampling
from .data import Record


@dataclasses.dataclass
class Node:
    text: str                  # this step's text ("" at the root)
    ids: list                  # its sampled token ids
    done: bool = False         # ended at EOS: a finished answer
    children: list = dataclasses.field(default_factory=list)
    leaf_scores: list = dataclasses.field(default_factory=list)

    @property
    def value(self) -> float:
        """The mean score of the leaves below (NaN where the judge failed on all of them)."""
        finite = [s for s in self.leaf_scores if math.isfinite(s)]
        return sum(finite) / len(finite) if finite else math.nan


def cut_step(ids: list[int], boundary: int | None) -> list[int]:
    """A sampled continuation cut after its first step boundary token (kept), if any."""
    if boundary is not None and boundary in ids:
        return ids[:ids.index(boundary) + 1]
    return ids


def path_text(path: list[Node]) -> str:
    return "".join(node.text for node in path)


def sibling_pairs(prompt: str, root: Node, where: str) -> list[Record]:
    """Step 4 of the module docstring: one pair per node whose children's values differ, best against worst."""
    records = []

    def visit(node, path):
        valued = [child for child in node.children if math.isfinite(child.value)]
        if len(valued) >= 2:
            best = max(valued, key=lambda child: child.value)
            worst = min(valued, key=lambda child: child.value)
            if best.value > worst.value and best.text != worst.text:
                records.append(Record(f"{where}[{len(path)}]", prompt + path_text(path[1:]), [best.text, worst.text],
                                      completion_ids=[best.ids, worst.ids]))
        for child in node.children:
            visit(child, path + [child])
    visit(root, [root])
    return records


def grow(model, tokenizer, prompts: list[str], *, depth: int, branching: int, boundary: int | None,
         step_max_tokens: int, rollout_tokens: int, temperature: float, top_p: float, seed: int, device,
         batch_size: int) -> tuple[list[Node], list[list[tuple[list[Node], str]]], int]:
    """Steps 1 and 2: (roots, per prompt its leaves as (path from the root, full completion text), new tokens)."""
    eos = tokenizer.eos_token_id
    roots = [Node("", []) for _ in prompts]
    frontier = [(p, [root]) for p, root in enumerate(roots)]
    new_tokens = 0
    for level in range(depth):
        if not frontier:
            break
        samples = sampling.sample(model, tokenizer, [prompts[p] + path_text(path) for p, path in frontier],
                                  k=branching, max_new_tokens=step_max_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed + level, device=device, batch_size=batch_size, progress=False)
        new_tokens += samples.new_tokens
        next_frontier = []
        for (p, path), group in zip(frontier, samples.completion_ids):
            for ids in group:
                ids = cut_step(ids, boundary)
                child = Node(tokenizer.decode(ids, skip_special_tokens=True), ids, done=bool(ids) and ids[-1] == eos)
                path[-1].children.append(child)
                if not child.done:
                    next_frontier.append((p, path + [child]))
        frontier = next_frontier
    leaves = [[] for _ in prompts]

    def finished(node, path, p):
        if node.done:
            leaves[p].append((path, path_text(path[1:])))
        for child in node.children:
            finished(child, path + [child], p)
    for p, root in enumerate(roots):
        finished(root, [root], p)
    if frontier:  # unfinished at depth: one rollout each
        rolled = sampling.sample(model, tokenizer, [prompts[p] + path_text(path) for p, path in frontier], k=1,
                                 max_new_tokens=rollout_tokens, temperature=temperature, top_p=top_p,
                                 seed=seed + depth, device=device, batch_size=batch_size, progress=False)
        new_tokens += rolled.new_tokens
        for (p, path), text in zip(frontier, rolled.completions):
            leaves[p].append((path, path_text(path[1:]) + text[0]))
    return roots, leaves, new_tokens


def step_pairs(model, tokenizer, judge, prompts: list[str], *, where: str, **options) -> tuple[list[Record], dict]:
    """Records of MCTS-DPO's step-level pairs for `prompts` (module docstring) and the round's figures."""
    began = time.perf_counter()
    roots, leaves, new_tokens = grow(model, tokenizer, prompts, **options)
    sampled = time.perf_counter()
    records, scores = [], []
    for p, (prompt, root) in enumerate(zip(prompts, roots)):
        if len(leaves[p]) < 2 and judge.pairwise:
            continue  # a pairwise judge compares leaves; one leaf has no opponent (and no sibling to pair)
        values = judge.scores([prompt], [[text for _, text in leaves[p]]])[0].tolist()
        scores += values
        for (path, _), value in zip(leaves[p], values):
            for node in path:
                node.leaf_scores.append(value)
        records += sibling_pairs(prompt, root, f"{where}#p{p}")
    stats = dict(prompts=len(prompts), completions=sum(map(len, leaves)), pairs=len(records), records=len(records),
                 pair_yield=len(records) / max(len(prompts), 1))
    return records, dict(stats=stats, scores=torch.tensor(scores, dtype=torch.float64), new_tokens=new_tokens,
                         sample_s=sampled - began, judge_s=time.perf_counter() - sampled)
