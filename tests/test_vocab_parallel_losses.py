"""Vocabulary-sharded losses, token KL and diagnostics on 2 and 4 gloo ranks against one process.

Each rank holds uneven rows of every lm_head (policy, reference: sharded alike), the same hidden states
and targets; it must get the single process's loss, metrics and hidden-state gradient, and its rows of
the single process's weight gradient. Every strategy runs the per-token op per shard: auto -> sliced,
budget -> lean (recorded as such). The per-token KL and the diagnostics (top-k merged over the ranks)
are held to float64 from the definitions.
"""
import os

import pytest
import torch
import torch.distributed as dist

import prefops
from conftest import assert_fp32_close, assert_records_close, relative_error, value_tolerance
from helpers import kl64, token_values64
from prefops.listwise import ListwiseLoss
from prefops.strategy import last_path
from prefops.unpaired import UnpairedLoss
from test_vocab_parallel import spawn, uneven_bounds

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is unavailable")

HIDDEN, VOCAB, BETA = 12, 43, 0.2
# The first row of every shard, at either world size: a target on every rank.
SHARD_STARTS = sorted(set(uneven_bounds(VOCAB, 2)[:-1]) | set(uneven_bounds(VOCAB, 4)[:-1]))
STRATEGIES = {"auto": "sliced", "budget": "lean"}


def _randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def _weight(g):
    return _randn(g, VOCAB, HIDDEN, scale=3 / HIDDEN**0.5)


def _targets(g, rows, length):
    """Targets in every shard's rows, two prompt tokens and a ragged padding."""
    targets = torch.randint(0, VOCAB, (rows, length), generator=g)
    targets[:, 2:2 + len(SHARD_STARTS)] = torch.tensor(SHARD_STARTS)
    targets[:, :2] = -100
    for row in range(rows):
        targets[row, length - row % 3:] = -100
    return targets


def _pairwise(shard, group, strategy):
    """sigmoid + sft with TRL's token metrics, the reference's log-probs from its own sharded weight."""
    g = torch.Generator().manual_seed(1)
    hidden, weight, ref_weight = _randn(g, 6, 11, HIDDEN), _weight(g), _weight(g)
    ref_hidden, targets = hidden + _randn(g, 6, 11, HIDDEN, scale=0.3), _targets(g, 6, 11)
    module = prefops.PreferenceLoss(["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=BETA, token_metrics=True,
                                    strategy=strategy, vocab_group=group)
    return hidden, weight, lambda h, w: module(h, w, targets, ref_hidden=ref_hidden, ref_weight=shard(ref_weight))


def _simpo_wpo(shard, group, strategy):
    """SimPO with WPO's weights (sum p^2 merged over the shards)."""
    g = torch.Generator().manual_seed(2)
    hidden, weight, targets = _randn(g, 4, 9, HIDDEN), _weight(g), _targets(g, 4, 9)
    module = prefops.PreferenceLoss("simpo", beta=BETA, wpo=True, strategy=strategy, vocab_group=group)
    return hidden, weight, lambda h, w: module(h, w, targets)


def _listwise(shard, group, strategy):
    g = torch.Generator().manual_seed(3)
    hidden, weight, ref_weight = _randn(g, 7, 8, HIDDEN), _weight(g), _weight(g)
    ref_hidden, targets = hidden + _randn(g, 7, 8, HIDDEN, scale=0.3), _targets(g, 7, 8)
    lists = torch.tensor([[0, 1, 2], [3, 4, -1], [5, 6, -1]])
    scores = _randn(g, 3, 3)
    module = ListwiseLoss("plackett_luce", beta=BETA, strategy=strategy, vocab_group=group)
    return hidden, weight, lambda h, w: module(h, w, targets, lists=lists, scores=scores, ref_hidden=ref_hidden,
                                               ref_weight=shard(ref_weight))


def _kto(shard, group, strategy):
    """KTO with its reference point from mismatched pairs (the policy's own sharded weight again)."""
    g = torch.Generator().manual_seed(4)
    hidden, weight = _randn(g, 5, 9, HIDDEN), _weight(g)
    ref_hidden, kl_hidden = hidden + _randn(g, 5, 9, HIDDEN, scale=0.3), _randn(g, 5, 9, HIDDEN)
    targets, kl_targets = _targets(g, 5, 9), _targets(g, 5, 9)
    labels = torch.tensor([True, False, True, True, False])
    module = UnpairedLoss("kto", beta=BETA, strategy=strategy, vocab_group=group)

    def run(h, w):
        return module(h, w, targets, labels=labels, ref_hidden=ref_hidden, ref_weight=w.detach(), kl_hidden=kl_hidden,
                      kl_targets=kl_targets, ref_kl_hidden=kl_hidden + 0.1)

    return hidden, weight, run


def _tdpo(shard, group, strategy):
    """TDPO2: the per-token KL with both models sharded alike."""
    g = torch.Generator().manual_seed(5)
    hidden, weight, ref_weight = _randn(g, 6, 10, HIDDEN), _weight(g), _weight(g)
    ref_hidden, targets = hidden + _randn(g, 6, 10, HIDDEN, scale=0.3), _targets(g, 6, 10)
    module = prefops.PreferenceLoss("tdpo2", beta=BETA, tdpo_alpha=0.7, strategy=strategy, vocab_group=group)
    return hidden, weight, lambda h, w: module(h, w, targets, ref_hidden=ref_hidden, ref_weight=shard(ref_weight))


CASES = {"sigmoid_sft_metrics": _pairwise, "simpo_wpo": _simpo_wpo, "listwise": _listwise, "kto": _kto,
         "tdpo2": _tdpo}


def _run_all(shard, group):
    """{(case, strategy): (loss, metrics, h.grad, W.grad (this rank's rows), path)}."""
    results = {}
    for name, case in CASES.items():
        for strategy in STRATEGIES:
            hidden, weight, run = case(shard, group, strategy)
            h, w = hidden.clone().requires_grad_(), shard(weight).requires_grad_()
            loss, metrics = run(h, w)
            path = last_path()
            loss.backward()
            results[name, strategy] = (loss.detach(), {k: float(v) for k, v in metrics.items()}, h.grad, w.grad, path)
    return results


def _diagnostics_inputs():
    g = torch.Generator().manual_seed(6)
    hidden, weight, ref_weight = _randn(g, 15, HIDDEN), _weight(g), _weight(g)
    ref_hidden, targets = hidden + _randn(g, 15, HIDDEN, scale=0.5), _targets(g, 1, 15)[0]
    return hidden, weight, ref_hidden, ref_weight, targets


def _top_ks(bounds):
    """A k within every shard, and one beyond the first shard's rows (its top-k padded before the merge)."""
    return 5, bounds[1] + 2


def _worker(rank, world, out_dir):
    group = dist.new_group(list(range(world)))
    bounds = uneven_bounds(VOCAB, world)
    rows = slice(bounds[rank], bounds[rank + 1])
    results = _run_all(lambda x: x[rows].clone(), group)
    hidden, weight, ref_hidden, ref_weight, targets = _diagnostics_inputs()
    results["diagnostics"] = [prefops.linear_diagnostics(hidden, weight[rows], targets, ref_hidden=ref_hidden,
                                                         ref_weight=ref_weight[rows], top_k=k, vocab_group=group)
                              for k in _top_ks(bounds)]
    with pytest.raises(ValueError, match="ref_weight must be sharded alike"):
        prefops.linear_token_kl(hidden, weight[rows], ref_hidden, ref_weight, vocab_group=group)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module", params=[2, 4], ids=["2_ranks", "4_ranks"])
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_losses")
    spawn(_worker, request.param, str(out))
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(request.param)]


def test_sharded_losses_equal_one_process(ranks):
    bounds = uneven_bounds(VOCAB, len(ranks))
    single = _run_all(lambda x: x.clone(), None)
    tokens = 70 + VOCAB  # sums over the tokens, and over the vocabulary in another order
    for key, (loss, metrics, h_grad, w_grad, _) in single.items():
        name = "/".join(key)
        for rank, result in enumerate(ranks):
            rank_loss, rank_metrics, rank_h_grad, rank_w_grad, path = result[key]
            assert path == STRATEGIES[key[1]], (name, path)
            assert_fp32_close(rank_loss, loss, tokens, f"{name} loss on rank {rank}")
            assert_records_close(rank_metrics, metrics, tokens)
            assert h_grad.abs().max() > 0
            assert_fp32_close(rank_h_grad, h_grad, tokens, f"{name} h.grad on rank {rank}")
            assert_fp32_close(rank_w_grad, w_grad[bounds[rank]:bounds[rank + 1]], tokens,
                              f"{name} W.grad rows of rank {rank}")


def test_sharded_diagnostics_and_token_kl_match_float64(ranks):
    hidden, weight, ref_hidden, ref_weight, targets = _diagnostics_inputs()
    z, y = hidden.double() @ weight.double().t(), ref_hidden.double() @ ref_weight.double().t()
    counted = targets != -100
    logp, _, entropy, sum_p2, _ = token_values64(z, targets)
    kl = torch.where(counted, kl64(z, y), 0.0)
    tolerance = value_tolerance(HIDDEN, VOCAB)
    for index, k in enumerate(_top_ks(uneven_bounds(VOCAB, len(ranks)))):
        top_logp, top_ids = z.log_softmax(-1).topk(k, dim=1)
        for rank, result in enumerate(ranks):
            diagnostics = result["diagnostics"][index]
            for label, actual, expected in (("logp", diagnostics.logp, logp), ("entropy", diagnostics.entropy,
                                            entropy), ("sum_p2", diagnostics.sum_p2, sum_p2),
                                            ("kl", diagnostics.kl_to_reference, kl),
                                            ("top_k_logp", diagnostics.top_k_logp[counted], top_logp[counted])):
                assert relative_error(actual, expected) <= tolerance, (k, rank, label)
            assert torch.equal(diagnostics.top_k_ids[counted], top_ids[counted]), (k, rank)
            assert (diagnostics.top_k_ids[~counted] == -1).all()
