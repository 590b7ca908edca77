"""TRL's DPOTrainer with the loss computed by prefops: swap `DPOTrainer(` for `PrefopsDPOTrainer(`
(and TRL's experimental OnlineDPOTrainer: `OnlineDPOTrainer(` for `PrefopsOnlineDPOTrainer(`, below).

    from prefops.integrations.trl import PrefopsDPOTrainer
    trainer = PrefopsDPOTrainer(model=model, args=DPOConfig(...), train_dataset=dataset, processing_class=tokenizer)

Everything else is TRL's (data preparation, reference precomputation and caching,
PEFT reference adapters, logging). Only the loss changes: the policy's final hidden
states go straight into prefops.PreferenceLoss with TRL's settings (loss_type list
with loss_weights, beta, label_smoothing, f_divergence_type, ld_alpha, use_weighting
(WPO), discopop_tau), and the reference runs forward-only on the fused path or comes
precomputed from the batch. Neither model builds the N x V logits.

padding_free=True, which TRL 1.x switches off, runs here: the sequences of a batch
go back to back in one row with restarting position_ids (transformers keeps them
from attending to each other), so no padding token reaches the body or the head.

Metrics keep TRL's names (rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected, num_tokens, aux_loss, and entropy,
logits/chosen, logits/rejected, mean_token_accuracy from the same fused pass:
PreferenceLoss(token_metrics=True)). As in TRL, those four are token-weighted
across ranks: each rank's value times its token count, summed, over the summed
counts. Top-1 counts a tie at the maximum logit as a hit, where TRL's argmax
takes the lowest id; exact ties of fp32 logits are rare.

Written against TRL >= 1.15 (prefops.versions.TRL_DROP_INS): its DPOTrainer's compute_loss /
compute_ref_log_probs, and OnlineDPOTrainer._forward.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..preference import PreferenceLoss
from ..versions import TRL_DROP_INS, require
from .hf import (PreferenceInputs, _logprobs, _peft_reference, check_head, completion_logps, final_hidden_states,
                 fused_loss, head_call)

# Before trl's own imports: an older TRL fails inside them, or imports and then runs other internals.
require("trl", TRL_DROP_INS, "prefops.integrations.trl (PrefopsDPOTrainer, PrefopsOnlineDPOTrainer)")

from trl import DPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402

__all__ = ["DataCollatorForPaddingFreePreference", "PrefopsDPOTrainer", "PrefopsOnlineDPOTrainer"]

# TRL's ratio metrics and the token counts (PreferenceLoss metrics) they are averages over.
TOKEN_WEIGHTED = {"entropy": ("num_tokens/chosen", "num_tokens/rejected"), "logits/chosen": ("num_tokens/chosen",),
                  "logits/rejected": ("num_tokens/rejected",), "mean_token_accuracy": ("num_tokens/chosen",)}


@dataclasses.dataclass
class DataCollatorForPaddingFreePreference:
    """Examples with prompt_ids / chosen_ids / rejected_ids -> one row, no padding.

    input_ids [1, N]: prompt + chosen of every example, then prompt + rejected of
    every example; position_ids [1, N] restart at 0 for each sequence;
    completion_mask [1, N]; ref_chosen_logps / ref_rejected_logps [P] when the
    examples carry them. Truncation per sequence as TRL's DataCollatorForPreference.
    """
    max_length: int | None = None
    truncation_mode: str = "keep_start"

    def __call__(self, examples):
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end'; got {self.truncation_mode!r}")
        ids, completion, positions = [], [], []
        for key in ("chosen_ids", "rejected_ids"):
            for example in examples:
                sequence = list(example["prompt_ids"]) + list(example[key])
                mask = [0] * len(example["prompt_ids"]) + [1] * len(example[key])
                if self.max_length is not None:
                    keep = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(
                        -self.max_length, None)
                    sequence, mask = sequence[keep], mask[keep]
                ids += sequence
                completion += mask
                positions += range(len(sequence))
        batch = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
                 "completion_mask": torch.tensor([completion])}
        for name in ("ref_chosen_logps", "ref_rejected_logps"):
            if name in examples[0]:
                batch[name] = torch.tensor([example[name] for example in examples])
        return batch


class PrefopsDPOTrainer(DPOTrainer):
    """trl.DPOTrainer whose loss never builds the logits; same arguments, same metrics names."""

    def __init__(self, model, ref_model=None, args=None, data_collator=None, *rest, **kwargs):
        padding_free = bool(args is not None and args.padding_free)
        if padding_free:
            args.padding_free = False  # TRL would warn and fall back to padding; this trainer runs it
            if data_collator is None:
                data_collator = DataCollatorForPaddingFreePreference(args.max_length, args.truncation_mode)
        super().__init__(model, ref_model, args, data_collator, *rest, **kwargs)
        self.args.padding_free = self.padding_free = padding_free
        self.prefops_loss = PreferenceLoss(
            self.loss_types, beta=self.beta, label_smoothing=self.label_smoothing, loss_weights=self.loss_weights,
            ld_alpha=self.ld_alpha, wpo=self.use_weighting, f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef, discopop_tau=self.args.discopop_tau,
            token_metrics=True)
        check_head(self.model)

    def compute_ref_log_probs(self, model, inputs):
        """Reference completion log-probs (chosen [P], rejected [P]) of one batch, forward-only and fused."""
        batch = PreferenceInputs.from_batch(inputs)
        context = contextlib.nullcontext()
        if self.ref_model is None:  # a PEFT policy is its own reference: its 'ref' adapter, or none
            context = _peft_reference(self.accelerator.unwrap_model(self.model)) or context
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                context, self.accelerator.autocast():
            logps = completion_logps(model, batch, ld_alpha=self.ld_alpha)
        return logps[:batch.pairs], logps[batch.pairs:]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        batch = PreferenceInputs.from_batch(inputs)
        if not self.precompute_ref_logps:
            batch.ref_chosen_logps, batch.ref_rejected_logps = self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else model, inputs)
        elif batch.ref_chosen_logps is None:
            raise ValueError("precompute_ref_log_probs=True but the batch has no ref_chosen_logps / "
                             "ref_rejected_logps")
        model_kwargs = {"output_router_logits": True} if self.aux_loss_enabled else {}
        loss, metrics, outputs = fused_loss(model, batch, self.prefops_loss, **model_kwargs)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            metrics["aux_loss"] = outputs.aux_loss.detach()
        self._log_metrics(mode, metrics, inputs)
        return (loss, outputs) if return_outputs else loss

    def _log_metrics(self, mode, metrics, inputs):
        gather = lambda value: self.accelerator.gather_for_metrics(value.detach().float().reshape(1))  # noqa: E731
        for name, value in metrics.items():
            if name in TOKEN_WEIGHTED:
                tokens = sum(metrics[count] for count in TOKEN_WEIGHTED[name])
                total, tokens = gather(value * tokens).sum(), gather(tokens).sum()
                self._metrics[mode][name].append((total / tokens).item() if tokens > 0 else 0.0)
            else:
                self._metrics[mode][name].append(gather(value).mean().item())
        if mode == "train":
            mask = inputs.get("attention_mask")
            tokens = inputs["input_ids"].numel() if mask is None else mask.sum()
            tokens = torch.as_tensor(tokens, device=self.accelerator.device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(tokens).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


class _FusedOnlineLogprobs:
    """TRL's OnlineDPOTrainer (trl.experimental.online_dpo) whose log-probs never build the logits.

    Generation (transformers or vLLM), the reward functions, the chosen/rejected
    split, the sigmoid / IPO loss and every logged metric stay TRL's: they are
    computed from the per-token completion log-probs [2B, Tc] that `_forward` returns,
    for the policy (with grad) and the reference (TRL calls it under no_grad, with
    the PEFT adapter disabled when there is no ref_model). Only `_forward` changes:
    the final hidden states of the positions that predict completion tokens go with
    the lm_head into prefops.linear_logprobs, so neither model builds the N x V logits
    (TRL's builds them for prompt and completion, then a log-softmax copy).

    As in TRL, the log-probs are the model's own, without the sampling temperature,
    and the padding after EOS is scored as the pad token: TRL's objective/kl and
    objective/entropy sum over it unmasked. objective/entropy is TRL's sampled
    estimate (minus the summed log-probs of the sampled tokens), so it comes from the
    same log-probs; no full-vocabulary entropy is needed.
    """

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        check_head(self.model)

    def _forward(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs=None):
        # TRL's truncation and alignment, with the logits replaced by the fused op.
        if vision_inputs is None:
            cut = max(prompt_ids.size(1) + completion_ids.size(1) - self.max_length, 0)
            prompt_ids, prompt_mask = prompt_ids[:, cut:], prompt_mask[:, cut:]
        input_ids = torch.cat((prompt_ids, completion_ids), dim=1)
        attention_mask = torch.cat((prompt_mask, completion_mask), dim=1)
        hidden = final_hidden_states(model, input_ids, attention_mask, **(vision_inputs or {}))
        prompt_len = prompt_ids.size(1)
        # With the prompt cut away TRL scores position t on completion token t (nothing predicts the
        # first one); kept, so the two trainers agree.
        hidden = hidden[:, prompt_len - 1:-1] if prompt_len > 0 else hidden
        return head_call(model, hidden, lambda hidden, head: _logprobs(hidden, head, completion_ids))


def __getattr__(name):
    # Built on first use: importing trl.experimental warns, and TRL may move or drop it,
    # neither of which should reach PrefopsDPOTrainer users.
    if name != "PrefopsOnlineDPOTrainer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from trl.experimental.online_dpo import OnlineDPOTrainer

    trainer = type(name, (_FusedOnlineLogprobs, OnlineDPOTrainer), {"__doc__": _FusedOnlineLogprobs.__doc__})
    globals()[name] = trainer
    return trainer
