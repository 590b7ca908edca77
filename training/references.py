"""Reference log-probs for a dataset: from a frozen model, from a disk cache, or none.

Each returns a function batch -> one tensor [P] per completion of an example
((ref_chosen_logps, ref_rejected_logps) for pairs, (completion, KL partner) for
unpaired examples, one per list slot for ranked lists, 0 in a shorter list's
empty slots; a precomputed table has as many slots as the dataset's longest list), looked up by the batch's example indices, so the loss code
does not care which it is. With ld_alpha the sums are LD-DPO-weighted like the policy's.
Token-level losses get the reference's hidden states and head instead (frozen_distributions).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from tqdm import tqdm

from . import config as C
from . import distributed
from . import model as M
from .data import Dataset, collate


def no_reference(batch):
    return None, None


def of_dataset(kind: str, reference_model, dataset: Dataset, config, device, autocast):
    """The reference function of `dataset` for config.reference `kind` (model, precomputed or none)."""
    if kind == "none":
        return no_reference
    if kind == "model" and C.is_token_level(config):
        return frozen_distributions(reference_model, autocast)
    if kind == "model":
        return frozen_model(reference_model, config.loss_impl, autocast, config.ld_alpha)
    return precomputed(reference_model, dataset, config, device, autocast)


def per_slot(sums: torch.Tensor, batch) -> tuple:
    """Per-sequence values [S] -> one tensor [P] per completion slot (batches are slot-major)."""
    if batch.lists is None:
        return sums.reshape(-1, batch.num_examples).unbind(0)
    return torch.where(batch.lists >= 0, sums[batch.lists.clamp_min(0)], 0.0).unbind(1)


def frozen_model(reference_model, loss_impl: str, autocast, ld_alpha: float | None = None):
    @torch.no_grad()
    def logps(batch):
        with autocast():
            sums, _ = M.sequence_logprobs(reference_model, batch, loss_impl, ld_alpha)
        return per_slot(sums, batch)
    return logps


def frozen_distributions(reference_model, autocast):
    """For token-level losses (TDPO): batch -> (the reference's final hidden states, its LMHead).

    Under torchrun the head weight is copied out once: FSDP frees a gathered weight after each forward.
    """
    head = None

    def keep(hidden, batch_head):
        nonlocal head
        if head is None:
            head = batch_head if not distributed.active() else dataclasses.replace(
                batch_head, weight=batch_head.weight.detach().clone(),
                bias=None if batch_head.bias is None else batch_head.bias.detach().clone())
        return hidden

    @torch.no_grad()
    def distributions(batch):
        with autocast():
            hidden = reference_model(batch, keep)
        return hidden, head
    return distributions


def precomputed(reference_model, dataset: Dataset, config, device, autocast):
    """Log-probs of every example under the reference, cached per (dataset, reference weights).

    The reference model is needed only the first time; the cache file name is the
    hash of the tokenised dataset, of the reference weights and of ld_alpha, so a changed
    dataset, tokenizer, truncation or model never reads a stale cache. Under torchrun
    each rank computes its share of the micro-batches, every rank gets the whole table,
    and rank 0 writes it.
    """
    state = distributed.model_state(reference_model)  # collective under torchrun; full on rank 0
    weights = distributed.broadcast(M.weights_hash(state) if distributed.is_main() else None)
    weighting = "" if config.ld_alpha is None else f"-ld{config.ld_alpha:g}"
    path = Path(config.ref_cache_dir) / f"ref_logps-{dataset.fingerprint()}-{weights}{weighting}.pt"
    if distributed.broadcast(path.exists()):
        table = torch.load(path)
    else:
        compute = frozen_model(reference_model, config.loss_impl, autocast, config.ld_alpha)
        chunks = [list(range(start, min(start + config.micro_batch_size, len(dataset))))
                  for start in range(0, len(dataset), config.micro_batch_size)]
        ranks = distributed.world_size()
        chunks += chunks[:-len(chunks) % ranks]  # every rank runs as many forwards: FSDP's collectives pair up
        rows, width = {}, max(len(example.completion_ids) for example in dataset.examples)
        for indices in tqdm(chunks[distributed.rank()::ranks], desc="reference log-probs", leave=False,
                            disable=not distributed.is_main()):
            batch = collate(dataset, indices, packing=config.packing).to(device)
            slots = torch.stack(compute(batch), dim=1)
            rows.update(zip(indices, torch.nn.functional.pad(slots, (0, width - slots.shape[1])).cpu()))
        for part in distributed.all_gather_objects(rows):
            rows.update(part)
        table = torch.stack([rows[i] for i in range(len(dataset))])
        if distributed.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(table, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
        distributed.barrier()
    table = table.to(device)

    def logps(batch):
        return table[batch.indices].unbind(1)
    return logps
