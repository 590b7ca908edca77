"""Shared-prompt packing: one copy of the prompt, then its K responses, in a single sequence.

The unshared layout runs K sequences [prompt, response_k] through the model, so
a long prompt is processed K times. Here an example becomes

    tokens     p_0 ... p_{P-1} | a_0 ... a_{n-1} | b_0 ... b_{m-1} | ...
    positions  0   ...   P-1   | P   ... P+n-1   | P   ... P+m-1   | ...
    branch     0   ...   0     | 1   ...   1     | 2   ...   2     | ...

and the attention mask lets a token see an earlier token of its example only
when that token is in the prompt (branch 0) or in its own branch. Each response
therefore sees exactly what it sees alone after the prompt, at the same
positions, so its hidden states, log-probs, losses and gradients equal those of
the unshared layout (up to rounding).

Scoring. Token j of a response is predicted by the hidden state of the token
before it in its own unshared sequence: the previous token of the response, or,
for j = 0, the *last prompt token*. That last prompt position is shared by all
K responses, so one position cannot carry the K targets of a per-position
targets tensor. The layout instead lists the scored tokens: `rows[i]` is the
flat index (row * L + column) of the hidden state that predicts `targets[i]`,
and `seq_ids[i]` its sequence. `layout.gather(hidden)` returns those rows
[N, H] (the last prompt row appears K times), ready for any prefops op:

    hidden = shared_prompt_hidden_states(model, layout)          # [R, L, H]
    loss, metrics = prefops.PreferenceLoss("sigmoid", beta=0.1)(
        layout.gather(hidden), model.lm_head.weight, layout.targets, seq_ids=layout.seq_ids,
        ref_chosen_logps=..., ref_rejected_logps=...)              # or ref_hidden=layout.gather(ref_hidden)

The backward of the gather adds the K gradients of the shared row, as the
shared prompt receives them. Prompt rows never reach the vocabulary GEMMs.

Sequence numbering is slot-major: the first response of every example, then
the second, ... (numbers are dense when K varies). With K = 2 everywhere this is
PreferenceLoss's packed layout: pair e is sequences e (chosen) and E + e
(rejected). `groups` [E, K_max] lists each example's sequences (-1 for a missing
slot), as prefops.sequence_objective takes them for listwise heads.

Attention: `dense_mask()` is a bool [R, 1, L, L] mask for SDPA (eager takes its
additive form), `block_mask()` a FlexAttention BlockMask whose empty blocks are
skipped, the one to use for long sequences on a GPU. transformers (>= 4.48, 5.x)
passes a 4-D mask or a BlockMask given as `attention_mask` straight to the
attention layers; shared_prompt_hidden_states picks the form the model's
attention implementation takes. flash-attention's varlen kernels cannot express
this mask and are refused. With attn_implementation="prefops" (prefops.attention)
there is no mask at all: the layout itself goes to the attention (prefops_layout),
which runs each prompt once and each response against [prompt; response] keys.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from .attention import LAYOUT_KWARG, NAME
from .ops import linear_logprobs
from .sequences import sequence_sum

IGNORE_INDEX = -100
PACKING = ("example", "flat")


class UnsharedBatch(NamedTuple):
    """The same sequences in the ordinary padded layout: row s is sequence s, [prompt, response]."""
    input_ids: torch.Tensor       # [S, T]
    attention_mask: torch.Tensor  # [S, T] 1 on real tokens
    targets: torch.Tensor         # [S, T] targets[:, t] = input_ids[:, t + 1] on response tokens, else -100


@dataclasses.dataclass(frozen=True)
class SharedPromptLayout:
    input_ids: torch.Tensor     # [R, L] prompt then its responses, per example; pad_id after the last one
    position_ids: torch.Tensor  # [R, L] 0..P-1 on the prompt, P.. again in every response; 0 on padding
    document_ids: torch.Tensor  # [R, L] example index of every token, -1 on padding
    branch_ids: torch.Tensor    # [R, L] 0 on the prompt, k + 1 on response k, -1 on padding
    rows: torch.Tensor          # [N] flat index into [R * L] of the hidden state that predicts targets[i]
    targets: torch.Tensor       # [N] every response token, in sequence order
    seq_ids: torch.Tensor       # [N] sequence index of targets[i]
    groups: torch.Tensor        # [E, K_max] sequence indices of each example's responses, -1 for none
    prompts: tuple              # the inputs, as 1-D long tensors (kept for the unshared layout)
    responses: tuple

    @property
    def num_examples(self) -> int:
        return self.groups.shape[0]

    @property
    def num_sequences(self) -> int:
        return int((self.groups >= 0).sum())

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens the model processes in this layout."""
        return int((self.document_ids >= 0).sum())

    @property
    def unshared_tokens(self) -> int:
        """Real tokens of the unshared layout: the prompt once per response."""
        return sum(len(r) * p.numel() + sum(x.numel() for x in r) for p, r in zip(self.prompts, self.responses))

    @property
    def tokens_saved(self) -> int:
        return self.unshared_tokens - self.tokens

    def accounting(self) -> dict:
        """Token counts of both layouts, real and padded (what the model actually runs over)."""
        longest = max(p.numel() + x.numel() for p, r in zip(self.prompts, self.responses) for x in r)
        return {"tokens": self.tokens, "unshared_tokens": self.unshared_tokens, "tokens_saved": self.tokens_saved,
                "padded_tokens": self.input_ids.numel(), "unshared_padded_tokens": self.num_sequences * longest,
                "scored_tokens": self.targets.numel()}

    def to(self, device) -> "SharedPromptLayout":
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, L, H] hidden states -> [N, H], the row predicting each target (differentiable)."""
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(self.input_ids.shape):
            raise ValueError(f"hidden must have shape [R, L, H] with [R, L] = {tuple(self.input_ids.shape)}; "
                             f"got {tuple(hidden.shape)}")
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.rows.to(hidden.device))

    def dense_mask(self) -> torch.Tensor:
        """Bool [R, 1, L, L], True where query q may attend to key k (SDPA's convention)."""
        doc, branch = self.document_ids, self.branch_ids
        length = doc.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=doc.device).tril()
        same_doc = doc[:, :, None] == doc[:, None, :]
        visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
        return (same_doc & visible & causal)[:, None]

    def mask_mod(self):
        """FlexAttention mask_mod(b, h, q, kv) of the same mask."""
        doc, branch = self.document_ids, self.branch_ids

        def shared_prompt_mask(b, h, q, kv):
            same_doc = doc[b, q] == doc[b, kv]
            visible = (branch[b, kv] == 0) | (branch[b, q] == branch[b, kv])
            return same_doc & visible & (q >= kv)

        return shared_prompt_mask

    def block_mask(self, block_size: int = 128, compile: bool = False):
        """FlexAttention BlockMask of the mask: blocks where nothing is visible are skipped."""
        from torch.nn.attention.flex_attention import create_block_mask
        rows, length = self.input_ids.shape
        return create_block_mask(self.mask_mod(), B=rows, H=None, Q_LEN=length, KV_LEN=length,
                                 device=self.input_ids.device, BLOCK_SIZE=block_size, _compile=compile)

    def unshared(self, pad_id: int = 0) -> UnsharedBatch:
        """The unshared padded layout of the same sequences (right padding), for comparison and baselines."""
        sequences = [None] * self.num_sequences
        for e, (prompt, responses) in enumerate(zip(self.prompts, self.responses)):
            for k, response in enumerate(responses):
                sequences[int(self.groups[e, k])] = (prompt, response)
        length = max(p.numel() + r.numel() for p, r in sequences)
        device = self.input_ids.device
        input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
        targets = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(len(sequences), length, dtype=torch.long)
        for s, (prompt, response) in enumerate(sequences):
            p, n = prompt.numel(), response.numel()
            input_ids[s, :p + n] = torch.cat([prompt, response])
            attention_mask[s, :p + n] = 1
            targets[s, p - 1:p + n - 1] = response
        return UnsharedBatch(input_ids.to(device), attention_mask.to(device), targets.to(device))


def _as_ids(value, name: str) -> torch.Tensor:
    ids = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if ids.dim() != 1:
        raise ValueError(f"{name} must be a 1-D sequence of token ids; got shape {tuple(ids.shape)}")
    if ids.numel() == 0:  # checked first: torch.as_tensor([]) is float
        raise ValueError(f"{name} is empty; every prompt and response needs at least one token")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids; got dtype {ids.dtype}")
    if bool((ids < 0).any()):
        raise ValueError(f"{name} holds a negative token id ({int(ids.min())})")
    return ids.long()


def _check_examples(prompts, responses):
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must have one entry per example; got {len(prompts)} prompts "
                         f"and {len(responses)} response lists")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; need at least one example")
    checked_prompts = tuple(_as_ids(p, f"prompts[{e}]") for e, p in enumerate(prompts))
    checked = []
    for e, listed in enumerate(responses):
        if isinstance(listed, torch.Tensor) or len(listed) < 1:
            raise ValueError(f"responses[{e}] must be a list of K >= 1 responses (each a sequence of token ids); "
                             f"got {type(listed).__name__} of length {len(listed)}")
        checked.append(tuple(_as_ids(r, f"responses[{e}][{k}]") for k, r in enumerate(listed)))
    return checked_prompts, tuple(checked)


def build_layout(prompts, responses, *, packing: str = "example", pad_id: int = 0,
                 pad_to_multiple: int = 1, device=None) -> SharedPromptLayout:
    """Pack each prompt once, followed by its responses.

    Args:
        prompts: E token-id sequences (lists or 1-D tensors), each non-empty.
        responses: E lists of K_e >= 1 non-empty token-id sequences (K may vary).
        packing: 'example' (one row per example, padded to the longest: [E, L]) or
            'flat' (all examples in one row [1, L], the mask keeps them apart).
        pad_to_multiple: round L up (e.g. 128 for FlexAttention blocks).
    """
    if packing not in PACKING:
        raise ValueError(f"packing must be one of {', '.join(PACKING)}; got {packing!r}")
    if isinstance(pad_to_multiple, bool) or not isinstance(pad_to_multiple, int) or pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be an int >= 1; got {pad_to_multiple!r}")
    prompts, responses = _check_examples(prompts, responses)
    k_max = max(len(r) for r in responses)
    groups = torch.full((len(prompts), k_max), -1, dtype=torch.long)
    for k in range(k_max):  # slot-major numbering: [first responses; second responses; ...]
        for e, listed in enumerate(responses):
            if k < len(listed):
                groups[e, k] = int((groups >= 0).sum())

    pieces, scored, offset, row = [], [], 0, 0
    for e, (prompt, listed) in enumerate(zip(prompts, responses)):
        p = prompt.numel()
        lengths = [r.numel() for r in listed]
        pieces.append((row, offset, torch.cat([prompt, *listed]),
                       torch.cat([torch.arange(p)] + [torch.arange(p, p + n) for n in lengths]),
                       torch.cat([torch.zeros(p, dtype=torch.long)] +
                                 [torch.full((n,), k + 1, dtype=torch.long) for k, n in enumerate(lengths)]), e))
        start = offset + p
        for k, response in enumerate(listed):
            n = response.numel()
            # token j of the response is predicted from token j - 1, and token 0 from the last prompt token
            predecessors = torch.cat([torch.tensor([offset + p - 1]), torch.arange(start, start + n - 1)])
            scored.append((row, predecessors, response, int(groups[e, k])))
            start += n
        if packing == "flat":
            offset = start
        else:
            row += 1
    num_rows = 1 if packing == "flat" else len(prompts)
    length = max(o + ids.numel() for _, o, ids, *_ in pieces)
    length = -(-length // pad_to_multiple) * pad_to_multiple

    input_ids = torch.full((num_rows, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros(num_rows, length, dtype=torch.long)
    document_ids = torch.full((num_rows, length), -1, dtype=torch.long)
    branch_ids = torch.full((num_rows, length), -1, dtype=torch.long)
    for r, o, ids, positions, branch, e in pieces:
        span = slice(o, o + ids.numel())
        input_ids[r, span], position_ids[r, span], branch_ids[r, span] = ids, positions, branch
        document_ids[r, span] = e
    scored.sort(key=lambda item: item[3])
    rows = torch.cat([r * length + predecessors for r, predecessors, _, _ in scored])
    targets = torch.cat([response for _, _, response, _ in scored])
    seq_ids = torch.cat([torch.full((response.numel(),), s, dtype=torch.long) for _, _, response, s in scored])
    layout = SharedPromptLayout(input_ids, position_ids, document_ids, branch_ids, rows, targets, seq_ids, groups,
                                prompts, responses)
    return layout if device is None else layout.to(device)


def attention_mask_for(layout: SharedPromptLayout, implementation: str, dtype: torch.dtype = torch.float32):
    """The layout's mask in the form an attention implementation takes: 'sdpa' a bool [R, 1, L, L] mask,
    'eager' the additive form in `dtype` (0 or dtype's min), 'flex_attention' a BlockMask; None for 'prefops',
    which takes the layout itself (prefops_layout=layout)."""
    implementation = implementation or "eager"
    if implementation == NAME:
        return None
    if implementation == "flex_attention":
        return layout.block_mask()
    if implementation == "sdpa":
        return layout.dense_mask()
    if implementation == "eager":  # eager attention adds the mask to the scores
        allowed = layout.dense_mask()
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    raise ValueError(f"attention implementation must be one of {NAME}, sdpa, eager, flex_attention for shared-prompt "
                     f"packing; got {implementation!r} (flash-attention's varlen kernels cannot express the mask)")


def shared_prompt_hidden_states(model, layout: SharedPromptLayout) -> torch.Tensor:
    """Final hidden states [R, L, H] of a Hugging Face causal LM's decoder body on the layout."""
    body = model.get_decoder()
    dtype = next(body.parameters()).dtype
    mask = attention_mask_for(layout, model.config._attn_implementation, dtype)
    extra = {LAYOUT_KWARG: layout} if mask is None else {}
    output = body(input_ids=layout.input_ids, attention_mask=mask, position_ids=layout.position_ids, use_cache=False,
                  **extra)
    return output.last_hidden_state


def shared_prompt_logps(model, layout: SharedPromptLayout, *, temperature: float = 1.0, softcap=None):
    """Per-sequence summed response log-probs [S] (fp32) of a Hugging Face causal LM, with the fused op.

    The head is model.get_output_embeddings() (weight and bias); the hidden states
    are cast to its dtype, as the lm_head would under autocast."""
    head = model.get_output_embeddings()
    hidden = layout.gather(shared_prompt_hidden_states(model, layout)).to(head.weight.dtype)
    token = linear_logprobs(hidden, head.weight, layout.targets, bias=getattr(head, "bias", None),
                            temperature=temperature, softcap=softcap)
    return sequence_sum(token, seq_ids=layout.seq_ids, num_sequences=layout.num_sequences)
