"""Sequence-sharded losses (context parallelism): two gloo ranks, each holding a share of every
sequence's tokens, give the loss, metrics and gradients of one process holding all of them.

Every case cuts its sequence dimension (the padded batch's columns, a shared-prompt pack's
columns through the prompts, or a flat pack of sequences) at odd points into a middle piece
(rank 1) and both ends (rank 0), as context-parallel load balancing deals them; the shares are
uneven, and some loss groups lie on one rank only, so a budget chunk can be empty on the other.
Each rank's h.grad must be the single process's rows it holds, and W.grad summed over the ranks
the single process's.
"""
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist

import prefops
from prefops.listwise import ListwiseLoss
from prefops.chunks import budget_bytes_per_logit
from prefops.shared_prompt import build_layout
from prefops.unpaired import UnpairedLoss

from conftest import assert_fp32_close, assert_records_close

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is unavailable")

RANKS = 2
HIDDEN, VOCAB, BETA = 16, 53, 0.2
STRATEGIES = ("lean", "budget")


def _held(length, rank):
    """Which of `length` sequence positions `rank` holds (all of them for rank None)."""
    if rank is None:
        return torch.ones(length, dtype=torch.bool)
    start, stop = length // 3 | 1, 3 * length // 4 | 1
    middle = (torch.arange(length) >= start) & (torch.arange(length) < stop)
    return middle if rank == 1 else ~middle


def _randn(generator, *shape, scale=1.0):
    return torch.randn(*shape, generator=generator) * scale


def _weight(generator):
    return _randn(generator, VOCAB, HIDDEN, scale=3 / HIDDEN**0.5)


def _budget(max_group_tokens, sides=1):
    """Room for the largest loss group and a bit more: several chunks, no fallback to lean."""
    return (max_group_tokens + 3) * VOCAB * budget_bytes_per_logit(torch.float32, sides)


def _padded_targets(generator, rows, length, prompt=2):
    targets = torch.randint(0, VOCAB, (rows, length), generator=generator)
    targets[:, :prompt] = -100
    for row in range(rows):
        targets[row, length - int(torch.randint(0, 5, (), generator=generator)):] = -100
    return targets


class SharedPrompt:
    """A shared-prompt pack [R, L] (one example a row), its columns cut through the prompts."""

    def __init__(self, generator, prompt_lengths, responses_per_example):
        prompts = [torch.randint(0, VOCAB, (n,), generator=generator) for n in prompt_lengths]
        responses = [[torch.randint(0, VOCAB, (int(torch.randint(2, 8, (), generator=generator)),),
                                    generator=generator) for _ in range(k)] for k in responses_per_example]
        self.layout = build_layout(prompts, responses)
        rows, self.length = self.layout.input_ids.shape
        self.hidden = _randn(generator, rows, self.length, HIDDEN)
        self.ref_hidden = self.hidden + _randn(generator, rows, self.length, HIDDEN, scale=0.3)

    def shard(self, rank):
        """(columns held, scored tokens held, their hidden rows in the rank's [R, L_r] shard)."""
        columns = _held(self.length, rank)
        local = torch.cumsum(columns, 0) - 1
        row, column = self.layout.rows // self.length, self.layout.rows % self.length
        mine = columns[column]
        return columns, mine, row[mine] * int(columns.sum()) + local[column[mine]]

    def max_group_tokens(self):
        groups = self.layout.groups
        per_sequence = torch.bincount(self.layout.seq_ids)
        return int(torch.where(groups >= 0, per_sequence[groups.clamp_min(0)], 0).sum(1).max())


def _pairwise_shared(strategy, rank, group):
    """sigmoid + sft with TRL's token metrics, the reference from hidden states, on a shared-prompt pack."""
    g = torch.Generator().manual_seed(1)
    pack = SharedPrompt(g, [9, 4, 11], [2, 2, 2])
    weight, ref_weight = _weight(g), _weight(g)
    columns, mine, rows = pack.shard(rank)
    module = prefops.PreferenceLoss(["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=BETA, token_metrics=True,
                                    strategy=strategy, budget=_budget(pack.max_group_tokens()), sequence_group=group)

    def run(h, w):
        gather = lambda x: x.reshape(-1, HIDDEN)[rows]  # noqa: E731
        return module(gather(h), w, pack.layout.targets[mine], seq_ids=pack.layout.seq_ids[mine],
                      ref_hidden=gather(pack.ref_hidden[:, columns]), ref_weight=ref_weight)

    return pack.hidden, weight, run, pack.layout.targets.numel(), lambda x: x[:, columns]


def _simpo_padded(strategy, rank, group):
    """SimPO (length-normalised) with WPO's weights (per-sequence sum p^2 statistics), padded [2P, T]."""
    g = torch.Generator().manual_seed(2)
    pairs, length = 3, 13
    hidden, weight = _randn(g, 2 * pairs, length, HIDDEN), _weight(g)
    targets = _padded_targets(g, 2 * pairs, length)
    columns = _held(length, rank)
    module = prefops.PreferenceLoss("simpo", beta=BETA, wpo=True, strategy=strategy, budget=_budget(2 * length),
                                    sequence_group=group)
    return hidden, weight, lambda h, w: module(h, w, targets[:, columns]), 2 * pairs * length, lambda x: x[:, columns]


def _listwise_shared(strategy, rank, group):
    """all_pairs with sigmoid + sft (the NLL term's chosen length over the batch), ragged lists of 3, 2
    and 4 responses on a shared-prompt pack, the reference from hidden states."""
    g = torch.Generator().manual_seed(3)
    pack = SharedPrompt(g, [8, 5, 10], [3, 2, 4])
    weight, ref_weight = _weight(g), _weight(g)
    lists = pack.layout.groups
    scores = _randn(g, *lists.shape)
    columns, mine, rows = pack.shard(rank)
    module = ListwiseLoss("all_pairs", beta=BETA, pairwise_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                          strategy=strategy, budget=_budget(pack.max_group_tokens()), sequence_group=group)

    def run(h, w):
        gather = lambda x: x.reshape(-1, HIDDEN)[rows]  # noqa: E731
        return module(gather(h), w, pack.layout.targets[mine], seq_ids=pack.layout.seq_ids[mine], lists=lists,
                      scores=scores, ref_hidden=gather(pack.ref_hidden[:, columns]), ref_weight=ref_weight)

    return pack.hidden, weight, run, pack.layout.targets.numel(), lambda x: x[:, columns]


def _kto_padded(strategy, rank, group):
    """KTO with its reference point estimated from mismatched pairs, sharded like the completions."""
    g = torch.Generator().manual_seed(4)
    completions, length = 5, 13
    hidden, weight = _randn(g, completions, length, HIDDEN), _weight(g)
    ref_hidden = hidden + _randn(g, completions, length, HIDDEN, scale=0.3)
    kl_hidden = _randn(g, completions, length, HIDDEN)
    ref_kl_hidden = kl_hidden + _randn(g, completions, length, HIDDEN, scale=0.3)
    targets, kl_targets = _padded_targets(g, completions, length), _padded_targets(g, completions, length)
    labels = torch.tensor([True, False, True, True, False])
    columns = _held(length, rank)
    module = UnpairedLoss("kto", beta=BETA, strategy=strategy, budget=_budget(length), sequence_group=group)

    def run(h, w):
        return module(h, w, targets[:, columns], labels=labels, ref_hidden=ref_hidden[:, columns], ref_weight=weight,
                      kl_hidden=kl_hidden[:, columns], kl_targets=kl_targets[:, columns],
                      ref_kl_hidden=ref_kl_hidden[:, columns])

    return hidden, weight, run, completions * length, lambda x: x[:, columns]


def _tdpo_packed(strategy, rank, group):
    """TDPO2 on a flat pack of sequences (chosen and rejected side by side, prompt tokens between them
    with seq_id -1), the pack cut like one long sequence: some sequences and pairs on one rank only."""
    g = torch.Generator().manual_seed(5)
    pairs = 4
    seq_ids = []
    for pair in range(pairs):
        for sequence in (pair, pairs + pair):
            seq_ids += [-1] * int(torch.randint(1, 4, (), generator=g))
            seq_ids += [sequence] * int(torch.randint(2, 9, (), generator=g))
    seq_ids = torch.tensor(seq_ids)
    tokens = seq_ids.numel()
    hidden, weight = _randn(g, tokens, HIDDEN), _weight(g)
    ref_hidden, ref_weight = hidden + _randn(g, tokens, HIDDEN, scale=0.3), _weight(g)
    targets = torch.where(seq_ids >= 0, torch.randint(0, VOCAB, (tokens,), generator=g), -100)
    held = _held(tokens, rank)
    pair_tokens = torch.bincount(seq_ids[seq_ids >= 0])
    module = prefops.PreferenceLoss("tdpo2", beta=BETA, tdpo_alpha=0.7, strategy=strategy,
                                    budget=_budget(int((pair_tokens[:pairs] + pair_tokens[pairs:]).max()), sides=2),
                                    sequence_group=group)

    def run(h, w):
        return module(h, w, targets[held], seq_ids=seq_ids[held], ref_hidden=ref_hidden[held], ref_weight=ref_weight)

    return hidden, weight, run, tokens, lambda x: x[held]


CASES = {"sigmoid_sft_shared_prompt": _pairwise_shared, "simpo_wpo_padded": _simpo_padded,
         "listwise_shared_prompt": _listwise_shared, "kto_padded": _kto_padded, "tdpo_packed": _tdpo_packed}


def _run_all(rank=None, group=None):
    """{(case, strategy): (loss, metrics, h.grad, W.grad, tokens)} on this rank's share (rank None: all)."""
    results = {}
    for name, case in CASES.items():
        for strategy in STRATEGIES:
            hidden, weight, run, tokens, part = case(strategy, rank, group)
            h, w = part(hidden).clone().requires_grad_(), weight.clone().requires_grad_()
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # no silent fallback from budget to lean
                loss, metrics = run(h, w)
            loss.backward()
            metrics = {key: float(value) for key, value in metrics.items()}
            results[name, strategy] = (loss.detach(), metrics, h.grad, w.grad, tokens)
    return results


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    try:
        group = dist.new_group(list(range(RANKS)))
        with pytest.raises(ValueError, match="ld_alpha"):
            prefops.PreferenceLoss("sigmoid", ld_alpha=0.5, sequence_group=group)
        with pytest.raises(TypeError, match="sequence_group must be a torch.distributed.ProcessGroup"):
            ListwiseLoss(sequence_group=rank)
        torch.save(_run_all(rank, group), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sequence_shards_on_two_ranks_equal_one_process(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=RANKS, join=True)
    shards = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(RANKS)]
    single = _run_all()
    for key, (loss, metrics, h_grad, w_grad, tokens) in single.items():
        name = "/".join(key)
        # Each rank's token values are the single process's; only the order of the sums over tokens
        # (within and across ranks) differs, every result a sum of at most `tokens` terms.
        for rank, shard in enumerate(shards):
            rank_loss, rank_metrics, rank_h_grad, _, _ = shard[key]
            assert_fp32_close(rank_loss, loss, tokens, f"{name} loss on rank {rank}")
            assert_records_close(rank_metrics, metrics, tokens)
            part = CASES[key[0]](key[1], rank, None)[-1]
            assert part(h_grad).abs().max() > 0
            assert_fp32_close(rank_h_grad, part(h_grad), tokens, f"{name} h.grad on rank {rank}")
        assert_fp32_close(sum(shard[key][3] for shard in shards), w_grad, tokens, f"{name} W.grad")


def test_sequence_group_needs_torch_distributed():
    with pytest.raises(ValueError, match="sequence_group needs torch.distributed initialised"):
        UnpairedLoss("kto", sequence_group=object())
