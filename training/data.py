"""Rows in standard preference formats -> validated records -> token ids -> batches.

Row formats (the TRL conventions), as JSONL lines or Hugging Face `datasets` rows:
  pairwise   {"prompt", "chosen", "rejected"}      text, or lists of {"role", "content"}
             messages (the prompt may then be implicit: the shared leading messages);
             optionally "preference_prob" (P(chosen > rejected) in [0, 1], a soft label),
             "weight" (>= 0, the pair's factor in the loss) and "margin" (the reward
             margin R_chosen - R_rejected of another objective, for MODPO), each on
             every row of a source or on none (PAIR_FIELDS)
  sft        {"prompt", "completion"}
  ranked     {"prompt", "completions": [...], "scores": [...]}   higher score is better
  unpaired   {"prompt", "completion", "label": bool}              (KTO)
Every error names the row (file:line or source#index) and the field.

A tokenised example is one prompt with k completions (k=2 for a pair: chosen,
rejected; for an unpaired example its completion and a mismatched one for KTO's
KL term; for a ranked list its k scored completions, k may vary). A batch of P
examples holds its sequences completion-major (slot-major): every example's first
completion, then every second one, ... (for pairs: all chosen, then all rejected);
`lists` [P, K] gives each list's sequences. Targets are the next token on
completion positions and -100 on prompt and padding. Batches are padded [S, T],
packed (flat tokens with per-sequence position ids and cu_seqlens), or
shared-prompt packed (prefops.shared_prompt: each prompt once, then its
completions, in one row; targets are then the scored tokens only, see collate).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import random
from pathlib import Path

import torch

from prefops.losses.curriculum import curriculum_pairs
from prefops.shared_prompt import SharedPromptLayout, build_layout

from .synthetic import TASKS

IGNORE_INDEX = -100


class DataError(ValueError):
    pass


# ----------------------------------------------------------------------------- reading rows

def read_rows(source: str, *, kind: str, size: int, seed: int, list_size: int = 4) -> list[tuple[str, dict]]:
    """(where, row) pairs from a source; `kind` (and `list_size` for "ranked") picks the rows of a synthetic task."""
    if source.startswith("synthetic:"):
        name = source.split(":", 1)[1]
        if name not in TASKS:
            raise DataError(f"unknown synthetic task {name!r}; available: {', '.join(TASKS)}")
        rows = TASKS[name].rows(kind, size, seed, **({"list_size": list_size} if kind == "ranked" else {}))
        return [(f"{source}#{i}", row) for i, row in enumerate(rows)]
    if source.startswith("hf:"):
        return _read_hf(source)
    return _read_jsonl(Path(source))


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
            rows.append((where, row))
    if not rows:
        raise DataError(f"data file {path} holds no rows")
    return rows


def _read_hf(source: str) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: reading Hugging Face datasets needs `pip install datasets`") from None
    name, _, split = source[3:].partition(":")
    dataset = datasets.load_dataset(name, split=split or "train")
    return [(f"{source}#{i}", dict(row)) for i, row in enumerate(dataset)]


# ----------------------------------------------------------------------------- validating rows

@dataclasses.dataclass
class Record:
    """One validated row. Text fields are str; conversational fields are message lists."""
    where: str
    prompt: str | list
    completions: list          # pairwise: [chosen, rejected]; sft/unpaired: [completion]; ranked: all
    scores: list | None = None  # ranked only
    label: bool | None = None   # unpaired only
    stage: int | None = None    # curriculum pairs only: the pair's stage, easy (0) to hard
    preference_prob: float | None = None  # pairwise only: P(chosen > rejected), a soft label
    weight: float | None = None           # pairwise only: the pair's weight in the loss
    margin: float | None = None           # pairwise only: a reward margin of other objectives (MODPO)
    # Token ids of each completion as sampled (online rounds): trained verbatim, EOS only where it was
    # sampled, since decoding and encoding again need not give back the ids the policy produced.
    completion_ids: list | None = None

    @property
    def kind(self) -> str:
        if self.scores is not None:
            return "ranked"
        if self.label is not None:
            return "unpaired"
        return "pairwise" if len(self.completions) == 2 else "sft"


def _check_messages(where: str, field: str, value) -> list:
    if not value:
        raise DataError(f"{where}: field {field!r}: empty message list")
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(f"{where}: field {field!r}[{i}]: a message must be {{'role': str, 'content': str}}")
    return value


def _check_text_or_messages(where: str, field: str, value):
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _check_messages(where, field, value)
    raise DataError(f"{where}: field {field!r}: expected text or a list of messages, got {type(value).__name__}")


def _require(where: str, row: dict, field: str):
    if field not in row or row[field] is None:
        raise DataError(f"{where}: missing field {field!r} (row has {', '.join(sorted(row)) or 'no fields'})")
    return row[field]


# Optional per-pair fields of pairwise rows (Record attributes), with the values each takes.
PAIR_FIELDS = {"preference_prob": "a probability in [0, 1]", "weight": "a finite number >= 0",
               "margin": "a finite number"}


def _check_pair_value(where: str, field: str, value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (field != "preference_prob" or 0 <= value <= 1) and (field != "weight" or value >= 0)
    if not ok:
        raise DataError(f"{where}: field {field!r}: expected {PAIR_FIELDS[field]}, got {value!r}")
    return float(value)


def check_pair_fields(records: list[Record]) -> None:
    """Each per-pair field is on every record or on none, on pairwise records only, with valid values.

    No value stands in for a missing one: a pair without a soft label is not one with
    probability 1, nor is a pair without a margin one with margin 0.
    """
    for field in PAIR_FIELDS:
        given = [record for record in records if getattr(record, field) is not None]
        if given and len(given) < len(records):
            lacking = next(record for record in records if getattr(record, field) is None)
            raise DataError(f"{lacking.where}: missing field {field!r}, which {given[0].where} has: "
                            f"give every pair a {field!r} or none")
        for record in given:
            if record.kind != "pairwise":
                raise DataError(f"{record.where}: field {field!r}: only pairs carry it; this record is {record.kind}")
            _check_pair_value(record.where, field, getattr(record, field))


def parse_row(where: str, row: dict) -> Record:
    fields = {field: row[field] for field in PAIR_FIELDS if row.get(field) is not None}
    if "chosen" in row or "rejected" in row:
        fields = {field: _check_pair_value(where, field, value) for field, value in fields.items()}
        chosen = _check_text_or_messages(where, "chosen", _require(where, row, "chosen"))
        rejected = _check_text_or_messages(where, "rejected", _require(where, row, "rejected"))
        if type(chosen) is not type(rejected):
            raise DataError(f"{where}: field 'rejected': must be text like 'chosen' or messages like 'chosen'")
        if "prompt" in row or isinstance(chosen, str):
            prompt = _check_text_or_messages(where, "prompt", _require(where, row, "prompt"))
            if type(prompt) is not type(chosen):
                raise DataError(f"{where}: field 'prompt': mixes text and messages with 'chosen'")
            return Record(where, prompt, [chosen, rejected], **fields)
        # Implicit prompt: the conversations share all but their final assistant turn.
        if chosen[:-1] != rejected[:-1]:
            raise DataError(f"{where}: field 'rejected': without a 'prompt', chosen and rejected "
                            "must share every message but the last")
        return Record(where, chosen[:-1], [chosen[-1:], rejected[-1:]], **fields)
    if fields:
        kind = "ranked" if "completions" in row else "unpaired" if "label" in row else "prompt/completion"
        raise DataError(f"{where}: field {next(iter(fields))!r}: only prompt/chosen/rejected rows carry "
                        f"{', '.join(PAIR_FIELDS)}; this row is {kind}")
    prompt = _check_text_or_messages(where, "prompt", _require(where, row, "prompt"))
    if "completions" in row:
        completions = _require(where, row, "completions")
        if not isinstance(completions, list) or len(completions) < 2:
            raise DataError(f"{where}: field 'completions': expected a list of at least 2 completions")
        completions = [_check_text_or_messages(where, f"completions[{i}]", c) for i, c in enumerate(completions)]
        scores = _require(where, row, "scores")
        if (not isinstance(scores, list) or len(scores) != len(completions)
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
            raise DataError(f"{where}: field 'scores': expected {len(completions)} numbers, one per completion")
        return Record(where, prompt, completions, scores=scores)
    completion = _check_text_or_messages(where, "completion", _require(where, row, "completion"))
    if "label" in row:
        if not isinstance(row["label"], bool):
            raise DataError(f"{where}: field 'label': expected true or false, got {row['label']!r}")
        return Record(where, prompt, [completion], label=row["label"])
    return Record(where, prompt, [completion])


def records_for(rows: list[tuple[str, dict]], stage: str, *, unpaired: bool = False, ranked: bool = False
                ) -> tuple[list[Record], list[str]]:
    """Records a stage can train on, and a note for each row skipped.

    SFT takes single completions (the chosen of a pair, the desirable of unpaired rows);
    pairwise losses take pairs; unpaired losses (`unpaired`) take labelled completions,
    splitting each pair into a desirable chosen and an undesirable rejected completion.
    Ranked rows become the pair (best, worst), as done for UltraFeedback, unless
    `ranked` (listwise losses, curriculum pairs) keeps whole lists: a pair is then the
    list [chosen, rejected] with scores [1, 0].
    A pair's preference_prob, weight and margin (PAIR_FIELDS) describe the comparison:
    pairwise losses read them, SFT (which takes the chosen completion) does not, and
    unpaired, listwise and curriculum training refuse them (their losses have no per-pair terms).
    """
    records, skipped = [], []
    for where, row in rows:
        record = parse_row(where, row)
        carried = [field for field in PAIR_FIELDS if getattr(record, field) is not None]
        if record.kind == "ranked":
            best = max(range(len(record.scores)), key=record.scores.__getitem__)
            worst = min(range(len(record.scores)), key=record.scores.__getitem__)
            if record.scores[best] == record.scores[worst]:
                skipped.append(f"{where} (all scores tie)")
                continue
            if not ranked:
                record = Record(where, record.prompt, [record.completions[best], record.completions[worst]])
        elif ranked and stage != "sft" and record.kind == "pairwise":
            if carried:
                raise DataError(f"{where}: field {carried[0]!r}: listwise losses and curriculum pairs read no "
                                f"per-pair {', '.join(PAIR_FIELDS)}")
            record = Record(where, record.prompt, record.completions, scores=[1, 0])
        if stage == "sft":
            if record.label is False:
                skipped.append(f"{where} (undesirable completion: not used for SFT)")
                continue
            records.append(Record(where, record.prompt, record.completions[:1]))
        elif unpaired:
            if record.kind == "sft":
                raise DataError(f"{where}: unpaired losses need a 'label' (true = desirable) or a "
                                "prompt/chosen/rejected row; got prompt/completion only")
            if carried:
                raise DataError(f"{where}: field {carried[0]!r}: unpaired losses (kto, apo_zero_unpaired, bco) "
                                "split a pair into two labelled completions and read no per-pair fields")
            if record.kind == "pairwise":
                records += [Record(where, record.prompt, record.completions[:1], label=True),
                            Record(where, record.prompt, record.completions[1:], label=False)]
            else:
                records.append(record)
        elif record.kind == "unpaired":
            raise DataError(f"{where}: unpaired (KTO) rows need an unpaired loss: set loss_type to kto, "
                            "apo_zero_unpaired or bco")
        elif record.kind not in ("pairwise", "ranked"):
            raise DataError(f"{where}: preference training needs prompt/chosen/rejected or ranked rows, "
                            f"got a {record.kind} row")
        else:
            records.append(record)
    check_pair_fields(records)
    return records, skipped


def curriculum_records(records: list[Record], stages: int | str) -> list[Record]:
    """Curry-DPO: each ranked list's pairs (the best against every worse completion), easy -> hard.

    prefops.losses.curriculum_pairs orders them by stage (an int n: n near-equal stages
    of decreasing score gap; 'rank': one stage per rank distance, largest first), and
    then by gap; each pair keeps its stage, which step_indices trains in order.
    """
    pairs = curriculum_pairs(scores=[record.scores for record in records], stages=stages)
    return [Record(f"{records[pair.list_index].where}[{pair.chosen_index}>{pair.rejected_index}]",
                   records[pair.list_index].prompt,
                   [records[pair.list_index].completions[pair.chosen_index],
                    records[pair.list_index].completions[pair.rejected_index]], stage=pair.stage)
            for pair in pairs]


# ----------------------------------------------------------------------------- tokenising

@dataclasses.dataclass
class Example:
    where: str
    prompt_ids: list[int]
    completion_ids: list[list[int]]  # unpaired: [completion, the KL partner's completion]
    label: bool | None = None        # unpaired only: True = desirable
    scores: list | None = None       # ranked lists only: one per completion, larger = better
    stage: int | None = None         # curriculum pairs only
    preference_prob: float | None = None  # pairs only: Record's per-pair fields (PAIR_FIELDS)
    weight: float | None = None
    margin: float | None = None


def _render(tokenizer, prompt, completion, where: str) -> tuple[str, str, bool]:
    """(prompt text, completion text, whether the prompt text already holds special tokens)."""
    if isinstance(prompt, str):
        return prompt, completion, False
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError(f"{where}: the tokenizer's chat template does not render the prompt as a prefix "
                        "of the full conversation, so prompt and completion cannot be separated")
    return prompt_text, full_text[len(prompt_text):], True


def tokenize(tokenizer, record: Record, append_eos: bool = True) -> Example:
    rendered = [_render(tokenizer, record.prompt, completion, record.where) for completion in record.completions]
    prompt_text, _, templated = rendered[-1]
    if record.completion_ids is not None:
        if len(record.completion_ids) != len(record.completions):
            raise DataError(f"{record.where}: {len(record.completion_ids)} completion_ids for "
                            f"{len(record.completions)} completions")
        completion_ids = [list(ids) for ids in record.completion_ids]
    else:
        completion_ids = []
        for _, completion_text, _ in rendered:
            ids = tokenizer.encode(completion_text, add_special_tokens=False)
            if append_eos and (not ids or ids[-1] != tokenizer.eos_token_id):
                ids = ids + [tokenizer.eos_token_id]
            completion_ids.append(ids)
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=not templated)
    return Example(record.where, prompt_ids, completion_ids, record.label, record.scores, record.stage,
                   **{field: getattr(record, field) for field in PAIR_FIELDS})


def truncate(example: Example, max_length: int) -> Example | None:
    """Cut each sequence to max_length tokens; None when a completion loses every target token."""
    prompt = example.prompt_ids[:max_length]
    completions = [ids[:max_length - len(prompt)] for ids in example.completion_ids]
    # The first completion token is a target only if a prompt token precedes it.
    if any(len(ids) - (not prompt) < 1 for ids in completions):
        return None
    return dataclasses.replace(example, prompt_ids=prompt, completion_ids=completions)


@dataclasses.dataclass
class Dataset:
    examples: list[Example]
    skipped: list[str]  # "where (why)" for each row left out

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def curriculum(self) -> tuple | None:
        """The stage of every example when they are curriculum pairs (trained stage by stage), else None."""
        stages = tuple(example.stage for example in self.examples)
        return None if stages[0] is None else stages

    def fingerprint(self) -> str:
        """Hash of the token ids: what a reference-log-prob cache is keyed by."""
        digest = hashlib.sha256()
        for example in self.examples:
            digest.update(json.dumps([example.prompt_ids, example.completion_ids, example.label]).encode())
        return digest.hexdigest()[:16]


def build_dataset(records: list[Record], tokenizer, max_length: int, skipped: list[str],
                  append_eos: bool = True, seed: int = 0) -> Dataset:
    check_pair_fields(records)
    examples, skipped = [], list(skipped)
    for record in records:
        example = truncate(tokenize(tokenizer, record, append_eos), max_length)
        if example is None:
            skipped.append(f"{record.where} (completion truncated away by max_length={max_length})")
        else:
            examples.append(example)
    if not examples:
        raise DataError(f"no example left to train on; first skipped: {skipped[0] if skipped else 'none'}")
    if examples[0].label is not None:
        examples = _with_kl_partners(examples, max_length, seed)
    return Dataset(examples, skipped)


def _with_kl_partners(examples: list[Example], max_length: int, seed: int) -> list[Example]:
    """Give each unpaired example a second completion: that of another example, for KTO's KL estimate.

    KTO's reference point is the policy/reference log-ratio of completions that do not
    answer their prompt. TRL pairs them within each batch; a fixed partner per example
    (one cycle through a seeded shuffle) makes the estimate independent of batching,
    micro-batching and sharding, and lets a reference cache hold it.
    """
    order = list(range(len(examples)))
    random.Random(f"kl-{seed}").shuffle(order)
    partner = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    out = []
    for i, example in enumerate(examples):
        kl = examples[partner[i]].completion_ids[0][:max_length - len(example.prompt_ids)]
        out.append(Example(example.where, example.prompt_ids, [example.completion_ids[0], kl], example.label))
    return out


def split(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic held-out split of `fraction` of the records."""
    order = list(range(len(records)))
    random.Random(f"split-{seed}").shuffle(order)
    held = set(order[:round(len(records) * fraction)])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


# ----------------------------------------------------------------------------- batching

@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor            # [S, T] padded, or [1, N] packed
    targets: torch.Tensor              # same shape; IGNORE_INDEX on prompt and padding
    attention_mask: torch.Tensor | None  # [S, T] padded; None when packed
    position_ids: torch.Tensor | None  # [1, N] packed: restarts at 0 in every sequence
    cu_seqlens: torch.Tensor | None    # [S + 1] packed
    indices: torch.Tensor              # dataset index of each example [P]
    labels: torch.Tensor | None = None  # [P] bool, unpaired only (True = desirable)
    lists: torch.Tensor | None = None   # [P, K] ranked lists only: sequence index of each slot, -1 empty
    scores: torch.Tensor | None = None  # [P, K] ranked lists only: score of each slot (0 in empty ones)
    layout: SharedPromptLayout | None = None  # shared-prompt packing (targets are then the scored tokens)
    # [P] pairs only, when the dataset's rows carry them (data.PAIR_FIELDS): P(chosen > rejected),
    # the pair's weight in the loss, the reward margin of other objectives (MODPO).
    preference_probs: torch.Tensor | None = None
    pair_weights: torch.Tensor | None = None
    margins: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def num_examples(self) -> int:
        return self.indices.numel()

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1 if self.packed else self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel() if self.packed else int(self.attention_mask.sum())

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def tokens_saved(self) -> int:
        """Tokens the model did not run because each prompt was packed once (shared_prompt)."""
        return 0 if self.layout is None else self.layout.tokens_saved

    @property
    def seq_ids(self) -> torch.Tensor:
        """Packed: the sequence index of every token [1, N]."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)[None]

    def completion(self, k: int) -> "Batch":
        """The sub-batch of every example's k-th completion (sequences k*P .. (k+1)*P - 1)."""
        first, last = k * self.num_examples, (k + 1) * self.num_examples
        if self.packed:
            start, end = int(self.cu_seqlens[first]), int(self.cu_seqlens[last])
            return dataclasses.replace(self, input_ids=self.input_ids[:, start:end], targets=self.targets[:, start:end],
                                       position_ids=self.position_ids[:, start:end],
                                       cu_seqlens=self.cu_seqlens[first:last + 1] - start)
        width = int(self.attention_mask[first:last].sum(1).max())
        return dataclasses.replace(self, input_ids=self.input_ids[first:last, :width],
                                   targets=self.targets[first:last, :width],
                                   attention_mask=self.attention_mask[first:last, :width])

    def to(self, device) -> "Batch":
        return Batch(**{field.name: None if getattr(self, field.name) is None else getattr(self, field.name).to(device)
                        for field in dataclasses.fields(self)})


def _sequence(prompt_ids: list[int], completion_ids: list[int]) -> tuple[list[int], list[int]]:
    ids = prompt_ids + completion_ids
    # Position i predicts token i+1; only completion tokens are targets.
    targets = [ids[i + 1] if i + 1 >= len(prompt_ids) else IGNORE_INDEX for i in range(len(ids) - 1)]
    return ids, targets + [IGNORE_INDEX]


def _lists(examples: list[Example]) -> torch.Tensor:
    """[P, K]: the slot-major sequence index of each example's completions, -1 where a list is shorter."""
    width = max(len(e.completion_ids) for e in examples)
    lists = torch.full((len(examples), width), -1)
    count = 0
    for k in range(width):
        for p, example in enumerate(examples):
            if k < len(example.completion_ids):
                lists[p, k], count = count, count + 1
    return lists


def collate(dataset: Dataset, indices: list[int], *, packing: bool, shared_prompt: bool = False) -> Batch:
    """A batch of the examples `indices`: padded, packed, or shared-prompt packed.

    shared_prompt: prefops.shared_prompt.build_layout(packing="flat") puts each prompt
    once, followed by its completions, in one row; the batch is then a packed batch
    whose targets [1, N] are the layout's scored tokens (sequence-ordered, so
    cu_seqlens delimits them) and whose hidden states are the layout's gathered rows
    (model.hidden_states), so every loss path reads it like any packed batch.
    """
    examples = [dataset.examples[i] for i in indices]
    lists = _lists(examples)
    slots = sorted((lists >= 0).nonzero().tolist(), key=lambda slot: int(lists[slot[0], slot[1]]))
    sequences = [_sequence(examples[p].prompt_ids, examples[p].completion_ids[k]) for p, k in slots]
    index_tensor = torch.tensor(indices)
    labels = torch.tensor([e.label for e in examples]) if examples[0].label is not None else None
    extra = {name: torch.tensor([getattr(e, field) for e in examples], dtype=torch.float32)
             for field, name in (("preference_prob", "preference_probs"), ("weight", "pair_weights"),
                                 ("margin", "margins"))
             if getattr(examples[0], field) is not None}
    if examples[0].scores is not None:
        scores = torch.tensor([e.scores + [0.0] * (lists.shape[1] - len(e.scores)) for e in examples],
                              dtype=torch.float32)
        extra.update(lists=lists, scores=scores)
    if shared_prompt:
        layout = build_layout([e.prompt_ids for e in examples], [e.completion_ids for e in examples], packing="flat")
        counts = torch.bincount(layout.seq_ids, minlength=layout.num_sequences)
        return Batch(input_ids=layout.input_ids, targets=layout.targets[None], attention_mask=None,
                     position_ids=layout.position_ids, cu_seqlens=torch.nn.functional.pad(counts.cumsum(0), (1, 0)).int(),
                     indices=index_tensor, labels=labels, layout=layout, **extra)
    if packing:
        lengths = torch.tensor([len(ids) for ids, _ in sequences])
        return Batch(
            input_ids=torch.tensor([t for ids, _ in sequences for t in ids]).unsqueeze(0),
            targets=torch.tensor([t for _, targets in sequences for t in targets]).unsqueeze(0),
            attention_mask=None,
            position_ids=torch.cat([torch.arange(n) for n in lengths.tolist()]).unsqueeze(0),
            cu_seqlens=torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int(),
            indices=index_tensor,
            labels=labels,
            **extra,
        )
    width = max(len(ids) for ids, _ in sequences)
    pad_id = 0  # any valid id: attention and targets both ignore padding
    return Batch(
        input_ids=torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in sequences]),
        targets=torch.tensor([targets + [IGNORE_INDEX] * (width - len(targets)) for _, targets in sequences]),
        attention_mask=torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in sequences]),
        position_ids=None,
        cu_seqlens=None,
        indices=index_tensor,
        labels=labels,
        **extra,
    )


@functools.lru_cache(maxsize=4)
def _epoch_order(size: int, seed: int, stage: str, epoch: int, curriculum: tuple | None) -> list[int]:
    key = int(hashlib.sha256(f"{seed}-{stage}-{epoch}".encode()).hexdigest()[:15], 16)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(key)).tolist()
    if curriculum is None:
        return order
    # Curriculum stages in sequence, each one shuffled within: a stable sort of the shuffle by stage.
    return sorted(order, key=curriculum.__getitem__)


def step_indices(size: int, step: int, batch_size: int, seed: int, stage: str,
                 curriculum: tuple | None = None) -> list[int]:
    """Example indices of optimizer step `step`: a reshuffle every epoch, a pure function of the step.

    Because the data order depends on nothing but (seed, stage, step), a resumed run
    sees exactly the batches an uninterrupted run would. `curriculum` (the stage of
    every example, Dataset.curriculum) makes every epoch go through the stages in order.
    """
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [_epoch_order(size, seed, stage, p // size, curriculum)[p % size] for p in positions]


def step_stage(size: int, step: int, batch_size: int, seed: int, stage: str, curriculum: tuple) -> int:
    """The curriculum stage of optimizer step `step`: that of its first example.

    A step that straddles two stages thus belongs to the earlier one, so the policy at the
    first step of a stage has trained on every pair of the stages before it (Curry-DPO's
    reference refresh, reference_update: stage).
    """
    return curriculum[step_indices(size, step, batch_size, seed, stage, curriculum)[0]]
