"""Loss heads cost microseconds (issue 20, item 6): no host sync in a head call, one per step.

A head runs a few dozen ops on [P]-sized tensors inside the fused pass, once per chunk of loss
groups on the stored and chunked paths. On a GPU each op costs its kernel's few microseconds
while the CPU runs ahead of the GEMMs; an op that needs a value on the host instead stops the
CPU until every queued GEMM is done, and the GPU idles while the CPU issues what follows. That
was most of the 3-25 % the loss types cost over a logps-only head. prefops.tools.opcount counts
both on CPU (benchmarks/bench_head_overhead.py reports them); these tests hold them.
"""
import sys
from pathlib import Path

import pytest
import torch

import prefops
import prefops.listwise
import prefops.losses.listwise
import prefops.losses.pairwise
import prefops.preference
from prefops.losses import kto_loss, pairwise_loss
from prefops.losses.listwise import LISTWISE_LOSSES, listwise_loss
from prefops.tools.bench import IGNORE_INDEX, make_problem
from prefops.tools.opcount import OpCounter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_head_overhead as overhead  # noqa: E402
from bench_losses import LOSS_TYPES  # noqa: E402

# What a step may read on the host beyond the logps-only row: the value checks of its inputs
# (every completion has a token, preference_probs in [0, 1]; KTO: kl finite and which labels
# occur, for the metrics; listwise: lists, labels, lengths and the reference), together, once,
# before the fused pass starts.
ENTRY_SYNCS = 1
# Ops (views excluded) of one head call of bench_losses' loss types: today's counts plus a little
# room. Forward only; backward takes about as many. Each is a kernel of a few microseconds on a GPU,
# per chunk: checks or metrics back in the head would add ten or more.
HEAD_OPS = {"sigmoid": 12, "ipo": 13, "simpo": 11, "orpo": 26, "kto": 13,
            # Listwise: [P, K] and [P, K, K] tensors; the pair-based types run the pairwise loss on every (i, j).
            "plackett_luce": 23, "lipo_lambda": 40, "pro": 47, "adpo": 30, "list_ce": 22, "dcg_pairwise": 58,
            "all_pairs": 35}

# Every listwise loss type runs on every path, like bench_losses' types; variants (top_k, ties, other
# pairwise types) and the other pairwise types on lean and chunked (one head call, and one per chunk).
CASES = [(loss_type, path) for loss_type in overhead.ALL_TYPES for path in overhead.paths_of(loss_type)
         if loss_type in LOSS_TYPES or loss_type in LISTWISE_LOSSES or path in ("lean", "chunked")]


@pytest.fixture(scope="module")
def problem():
    return make_problem(overhead.SHAPE, torch.device("cpu"), dtype=torch.float32)


def check_syncs(counts: overhead.Counts, what: str) -> None:
    for call, head in enumerate(counts.heads):
        assert not head.syncs, f"{what}: head call {call} waits for the device: {head.summary()}"
    assert counts.step_syncs <= ENTRY_SYNCS, (
        f"{what}: the step waits for the device {counts.step_syncs} times more than the logps-only row: "
        f"{counts.step.summary()} against {counts.baseline.summary()}")


@pytest.mark.parametrize("loss_type,path", CASES)
def test_no_sync_in_a_head_and_one_per_step(problem, loss_type, path):
    counts = overhead.measure(loss_type, path, problem, time_calls=False)
    assert counts.path == path
    if path == "chunked":
        assert len(counts.heads) > 1  # every chunk calls the head: what this path multiplies
    else:
        assert len(counts.heads) == 1
    check_syncs(counts, f"{loss_type} on {path}")
    if loss_type in HEAD_OPS:
        ops = max(len(head.ops) for head in counts.heads)
        assert ops <= HEAD_OPS[loss_type], f"{loss_type}: {ops} ops per head call: {counts.heads[0].ops}"


def test_token_level_heads_do_not_sync(problem):
    hidden, weight, targets = problem.hidden, problem.weight, problem.targets
    refs = dict(ref_hidden=(hidden + 0.1).detach(), ref_weight=(weight * 0.9).detach())
    # The chunked path holds the policy's and the reference's logits: twice the budget of one side.
    chunked = dict(strategy="budget", budget=2 * overhead.strategy_of("chunked", problem)["budget"])
    for options in (dict(strategy="lean"), chunked):
        module = prefops.PreferenceLoss("tdpo2", ignore_index=IGNORE_INDEX, **options)
        with overhead.captured_heads(prefops.preference, "sequence_kl_objective") as calls:
            module(hidden, weight, targets, **refs)[0].backward()
        problem.clear_gradients()
        assert len(calls) == (1 if options["strategy"] == "lean" else problem.pairs)
        assert all(not counter.syncs for counter, _, _ in calls), [c.summary() for c, _, _ in calls]


# ---------------------------------------------------------------- the checks catch what they are for

def test_a_planted_item_in_a_loss_fails_the_check(problem, monkeypatch):
    sigmoid = prefops.losses.pairwise.LOSSES["sigmoid"]

    def planted(b):
        if b.delta.sum().item() > 1e30:  # a value read on the host, as a check in a loss would
            raise AssertionError("unreachable")
        return sigmoid(b)

    monkeypatch.setitem(prefops.losses.pairwise.LOSSES, "sigmoid", planted)
    with pytest.raises(AssertionError, match=r"head call 0 waits for the device: aten._local_scalar_dense x1"):
        check_syncs(overhead.measure("sigmoid", "chunked", problem, time_calls=False), "planted item")


def test_a_planted_copy_to_the_device_in_a_loss_fails_the_check(problem, monkeypatch):
    ipo = prefops.losses.pairwise.LOSSES["ipo"]
    # A tensor of Python numbers in a loss: on a GPU a host-to-device copy, which syncs the stream.
    monkeypatch.setitem(prefops.losses.pairwise.LOSSES, "ipo", lambda b: ipo(b) * b.chosen.new_tensor([1.0]))
    with pytest.raises(AssertionError, match="aten.lift_fresh"):
        check_syncs(overhead.measure("ipo", "lean", problem, time_calls=False), "planted copy")


def test_a_planted_sync_in_the_metrics_fails_the_check(problem, monkeypatch):
    metrics = prefops.losses.pairwise._metrics

    def planted(b, loss_types):
        if bool((b.chosen > 0).any()):  # `if tensor` in the metrics: once per step, after the fused pass
            raise AssertionError("unreachable")
        return metrics(b, loss_types)

    monkeypatch.setattr(prefops.losses.pairwise, "_metrics", planted)
    with pytest.raises(AssertionError, match="waits for the device 2 times more"):
        check_syncs(overhead.measure("simpo", "stored", problem, time_calls=False), "planted metrics sync")


def test_a_planted_item_in_a_listwise_loss_fails_the_check(problem, monkeypatch):
    plackett_luce = LISTWISE_LOSSES["plackett_luce"]

    def planted(b):
        if b.s.sum().item() > 1e30:
            raise AssertionError("unreachable")
        return plackett_luce(b)

    monkeypatch.setitem(LISTWISE_LOSSES, "plackett_luce", planted)
    for path in ("lean", "chunked"):
        with pytest.raises(AssertionError, match=r"head call 0 waits for the device: aten._local_scalar_dense x1"):
            check_syncs(overhead.measure("plackett_luce", path, problem, time_calls=False), "planted item")


def test_ordered_pairs_picked_by_nonzero_fail_the_check(problem, monkeypatch):
    # The pair-based types' former way: only the ordered pairs, whose number the host must read.
    pairs_loss = prefops.losses.listwise._pairs_loss

    def planted(b, weights):
        b.better.nonzero(as_tuple=True)
        return pairs_loss(b, weights)

    monkeypatch.setattr(prefops.losses.listwise, "_pairs_loss", planted)
    with pytest.raises(AssertionError, match="aten.nonzero x1"):
        check_syncs(overhead.measure("all_pairs", "stored", problem, time_calls=False), "planted nonzero")


def test_checks_run_again_in_the_listwise_head_fail_the_check(problem, monkeypatch):
    # A head that checks its part's values again (as listwise_loss per chunk did): a read per call.
    part = prefops.losses.listwise.ListBatch.part

    def planted(self, group_index, logps):
        prefops.losses.listwise._check_finite(logps, self.mask if group_index is None else self.mask[group_index],
                                              "logps")
        return part(self, group_index, logps)

    monkeypatch.setattr(prefops.losses.listwise.ListBatch, "part", planted)
    with pytest.raises(AssertionError, match="head call 0 waits for the device: Tensor.tolist x1"):
        check_syncs(overhead.measure("lipo_lambda", "chunked", problem, time_calls=False), "planted check")


def test_a_planted_sync_in_the_listwise_metrics_fails_the_check(problem, monkeypatch):
    metrics = prefops.losses.listwise.listwise_metrics

    def planted(b, loss_type):
        if bool((b.logps > 0).any()):
            raise AssertionError("unreachable")
        return metrics(b, loss_type)

    monkeypatch.setattr(prefops.losses.listwise, "listwise_metrics", planted)
    with pytest.raises(AssertionError, match="waits for the device 2 times more"):
        check_syncs(overhead.measure("adpo_soft_ties", "sliced", problem, time_calls=False), "planted metrics sync")


# ---------------------------------------------------------------- bad input: named, once, before the fused pass

@pytest.fixture
def no_fused_pass(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the fused pass started before the inputs were checked")
    monkeypatch.setattr(prefops.preference, "sequence_objective", fail)
    monkeypatch.setattr(prefops.unpaired, "sequence_objective", fail)
    monkeypatch.setattr(prefops.listwise, "sequence_objective", fail)


def test_bad_values_are_named_before_the_fused_pass(problem, no_fused_pass):
    pairs, refs = problem.pairs, dict(ref_chosen_logps=problem.ref[:problem.pairs],
                                      ref_rejected_logps=problem.ref[problem.pairs:])
    empty = problem.targets.clone()
    empty[pairs + 2] = IGNORE_INDEX  # pair 2's rejected completion has no token
    with pytest.raises(ValueError, match=r"rejected_lengths\[2\] = 0: pair 2 has no completion tokens"):
        prefops.PreferenceLoss("sigmoid")(problem.hidden, problem.weight, empty, **refs)
    probs = torch.full((pairs,), 0.5)
    probs[1] = 1.5
    with pytest.raises(ValueError, match=r"preference_probs must lie in \[0, 1\]"):
        prefops.PreferenceLoss("sppo", preference_probs=probs)(problem.hidden, problem.weight, problem.targets,
                                                               **refs)
    labels = torch.arange(2 * pairs) < pairs
    with pytest.raises(ValueError, match="kl must be finite; got nan"):
        prefops.UnpairedLoss("kto")(problem.hidden, problem.weight, problem.targets, labels=labels,
                                    ref_logps=problem.ref, kl=float("nan"))


LISTWISE_BAD = [
    (dict(lists=torch.tensor([[0, 1, 2, 3], [4, 5, 6, 9]])), r"lists entries must be sequence indices in \[0, 8\)"),
    (dict(lists=torch.tensor([[0, 1, 2, 3], [4, 5, 6, 3]])), "a sequence appears in more than one list slot"),
    (dict(lists=torch.tensor([[0, 1, 2, 3], [4, -1, -1, -1]])), "list 1 has 1 response"),
    (dict(scores=torch.tensor([[0.0, 1.0, float("nan"), 2.0], [0.0, 1.0, 2.0, 3.0]])),
     "scores of list 0 is nan at response 2"),
    (dict(ranks=torch.tensor([[1, 2, 2, 4], [1, 2, 5, 3]])), r"ranks of list 1 are not a \(tied\) ordering"),
    (dict(ranks=torch.tensor([[1, 2, 2.5, 4], [1, 2, 3, 4]])), "ranks of list 0 are not an ordering: 2.5"),
    (dict(ref_logps=torch.tensor([0.0] * 5 + [float("inf")] + [0.0] * 2)), "ref_logps of list 1 is inf at response 1"),
    (dict(empty=6), "lengths of list 1 is 0.0 at response 2; every response needs at least one completion token"),
]


@pytest.mark.parametrize("given,message", LISTWISE_BAD, ids=lambda x: str(x)[:40])
def test_bad_listwise_values_are_named_before_the_fused_pass(problem, no_fused_pass, given, message):
    targets = problem.targets.clone()
    if "empty" in given:
        targets[given.pop("empty")] = IGNORE_INDEX
    kwargs = {"scores": torch.arange(8.0).view(2, 4), "ref_logps": problem.ref, **given}
    if "ranks" in kwargs:
        kwargs.pop("scores")
    with pytest.raises(ValueError, match=message):
        prefops.ListwiseLoss("plackett_luce")(problem.hidden, problem.weight, targets, **kwargs)


@pytest.mark.parametrize("loss_type,params", [("plackett_luce", {}), ("dcg_pairwise", {"pairwise_type": "orpo"})])
def test_listwise_loss_reads_the_device_once(loss_type, params):
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(2, 3, 4, generator=g, dtype=torch.float64) * 50
    ranks, lengths = torch.tensor([[1, 2, 2, 4]] * 3), torch.randint(1, 30, (3, 4), generator=g).double()
    with OpCounter() as counter:
        listwise_loss(logps[0], logps[1], ranks=ranks, loss_type=loss_type, lengths=lengths, **params)
    assert counter.syncs == ["Tensor.tolist"]  # every check of its values, together


def test_pairwise_loss_reads_the_device_once():
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 50
    lengths = torch.randint(1, 30, (2, 5), generator=g).double()
    with OpCounter() as counter:
        pairwise_loss(logps[0], logps[1], logps[2], logps[3], loss_type=["sigmoid", "orpo"], chosen_lengths=lengths[0],
                      rejected_lengths=lengths[1], preference_probs=torch.full((5,), 0.8, dtype=torch.float64))
        kto_loss(logps[0], logps[1], torch.arange(5) < 2, kl=0.3)
    assert counter.syncs == ["Tensor.tolist"] * 2  # each checks its values and, KTO, finds its label groups


def test_the_script_reports(capsys):
    overhead.main(["--loss-types", "orpo,plackett_luce_ties", "--paths", "lean"])
    out = capsys.readouterr().out
    assert "| orpo | lean | 1 | " in out and "| plackett_luce_ties | lean | 1 | " in out
