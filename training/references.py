"""Reference log-probs for a dataset: from a frozen model, from a disk cache, or none.

Each returns a function batch -> (ref_chosen_logps, ref_rejected_logps), looked up
by the batch's example indices, so the loss code does not care which it is.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm import tqdm

from . import model as M
from .data import Dataset, collate


def no_reference(batch):
    return None, None


def frozen_model(reference_model, loss_impl: str, autocast):
    @torch.no_grad()
    def logps(batch):
        with autocast():
            sums, _ = M.sequence_logprobs(reference_model, batch, loss_impl)
        return sums[:batch.num_examples], sums[batch.num_examples:]
    return logps


def precomputed(reference_model, dataset: Dataset, config, device, autocast):
    """Log-probs of every example under the reference, cached per (dataset, reference weights).

    The reference model is needed only the first time; the cache file name is the
    hash of the tokenised dataset and of the reference weights, so a changed dataset,
    tokenizer, truncation or model never reads a stale cache.
    """
    path = Path(config.ref_cache_dir) / f"ref_logps-{dataset.fingerprint()}-{M.weights_hash(reference_model)}.pt"
    if path.exists():
        table = torch.load(path)
    else:
        compute = frozen_model(reference_model, config.loss_impl, autocast)
        rows = []
        starts = range(0, len(dataset), config.micro_batch_size)
        for start in tqdm(starts, desc="reference log-probs", leave=False):
            indices = list(range(start, min(start + config.micro_batch_size, len(dataset))))
            batch = collate(dataset, indices, packing=config.packing).to(device)
            chosen, rejected = compute(batch)
            rows.append(torch.stack([chosen, rejected], dim=1).cpu())
        table = torch.cat(rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(table, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    table = table.to(device)

    def logps(batch):
        rows = table[batch.indices]
        return rows[:, 0], rows[:, 1]
    return logps
