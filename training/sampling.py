"""Sampling K completions per prompt from the policy, for online preference learning.

Batched `generate` with the KV cache and left padding. Sampling is reproducible
from its seed and leaves the caller's RNG as it was (a resumed run must not
diverge). With a reference model and 0 < mixture_alpha, the tokens come from the
geometric mixture pi_theta^(1-a) pi_ref^a of policy and reference (Nash-MD,
IPO-MD): per token the logits (1 - a) z_theta + a z_ref.

The temperature and top-p warpers are built here, after the mixture, and generate
is told temperature 1, top-p 1 and top-k 0, so it adds none of its own: the order
mixture -> temperature -> top-p then holds whatever order a transformers version
gives its built-in warpers and user processors (5.x appends user processors
before its warpers; earlier versions merged them differently).
"""
from __future__ import annotations

import dataclasses
import inspect
import time

import torch
import transformers
from tqdm import tqdm


@dataclasses.dataclass
class Samples:
    prompts: list[str]                     # P
    completions: list[list[str]]           # [P][K] decoded text, special tokens skipped
    completion_ids: list[list[list[int]]]  # [P][K] generated ids up to and including EOS, no padding
    new_tokens: int                        # generated tokens (padding after EOS not counted)
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class GeometricMixture(transformers.LogitsProcessor):
    """(1 - alpha) z_theta + alpha z_ref: the logits of the geometric mixture of policy and reference.

    The reference runs incrementally with its own KV cache: the first call feeds it
    the (left-padded) prompts, each later call only the tokens generate appended
    since, with the attention mask extended by ones as generate extends the
    policy's. One instance serves one generate call.
    """

    def __init__(self, reference, alpha: float, attention_mask: torch.Tensor):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"mixture_alpha must lie in [0, 1]; got {alpha}")
        self.reference, self.alpha = reference, alpha
        self.attention_mask = attention_mask
        # The model fills the cache in place; transformers 5.24 renamed past_key_values to cache.
        self.cache = transformers.DynamicCache(config=reference.config)
        self.cache_kwarg = "cache" if "cache" in inspect.signature(reference.forward).parameters else "past_key_values"
        self.seen = 0  # tokens of each row the reference has consumed

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        new = input_ids[:, self.seen:]
        if self.seen:
            self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(new.shape)], dim=1)
        # Positions count the real tokens, as generate numbers the policy's: left padding does not shift them.
        positions = (self.attention_mask.long().cumsum(-1)[:, -new.shape[1]:] - 1).clamp_min(0)
        output = self.reference(input_ids=new, attention_mask=self.attention_mask, position_ids=positions,
                                use_cache=True, logits_to_keep=1, **{self.cache_kwarg: self.cache})
        self.seen = input_ids.shape[1]
        reference = output.logits[:, -1].to(scores.device, torch.float32)
        if reference.shape != scores.shape:
            raise ValueError(f"the reference's logits {tuple(reference.shape)} do not match the policy's "
                             f"{tuple(scores.shape)}: policy and reference must share the vocabulary")
        return (1 - self.alpha) * scores + self.alpha * reference


def left_padded(tokenizer, prompts: list[str], pad: int, device):
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    width = max(map(len, encoded))
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    return input_ids, attention_mask


def _until_eos(ids: list[int], eos: int) -> list[int]:
    # Cut at the first EOS, not at padding: the policy may sample the pad token as a real token.
    return ids[:ids.index(eos) + 1] if eos in ids else ids


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, k: int, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, seed: int, device, batch_size: int = 64, reference=None, mixture_alpha: float = 0.0,
           progress: bool = True) -> Samples:
    """k completions of each prompt, `batch_size` sequences per generate call (the samples depend on it:
    it sets how the seeded random stream is consumed).

    With `reference` and 0 < mixture_alpha the completions come from the geometric mixture of policy and
    reference; the reference must share the policy's tokenizer and device."""
    if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    for name, value in (("k", k), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1]; got {top_p}")
    if not 0.0 <= mixture_alpha <= 1.0:
        raise ValueError(f"mixture_alpha must lie in [0, 1]; got {mixture_alpha}")
    if mixture_alpha > 0 and reference is None:
        raise ValueError(f"mixture_alpha={mixture_alpha} samples from a mixture with the reference: pass reference")
    mixture = reference is not None and mixture_alpha > 0

    start = time.perf_counter()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = [prompt for prompt in prompts for _ in range(k)]
    generated = []
    models = [model, reference] if mixture else [model]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(seed)
            for first in tqdm(range(0, len(rows), batch_size), desc="sampling", unit="batch", leave=False,
                              dynamic_ncols=True, disable=not progress):
                input_ids, attention_mask = left_padded(tokenizer, rows[first:first + batch_size], pad, device)
                processors = transformers.LogitsProcessorList()
                if mixture:
                    processors.append(GeometricMixture(reference, mixture_alpha, attention_mask))
                if temperature != 1.0:
                    processors.append(transformers.TemperatureLogitsWarper(temperature))
                if top_p < 1.0:
                    processors.append(transformers.TopPLogitsWarper(top_p))
                output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                        temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                                        logits_processor=processors, max_new_tokens=max_new_tokens, use_cache=True,
                                        pad_token_id=pad, eos_token_id=eos)
                generated += [_until_eos(ids, eos) for ids in output[:, input_ids.shape[1]:].tolist()]
    finally:
        for m, training in zip(models, was_training):
            m.train(training)
    completion_ids = [generated[i:i + k] for i in range(0, len(generated), k)]
    return Samples(
        prompts=list(prompts),
        completions=[[tokenizer.decode(ids, skip_special_tokens=True) for ids in group] for group in completion_ids],
        completion_ids=completion_ids, new_tokens=sum(map(len, generated)), seconds=time.perf_counter() - start)
