"""The default's paths (prefops.strategy): which one runs for which shapes and workspace, each
exact against float64 written from the definitions, and each within its memory.

sliced   cuBLAS-style slices (a GEMM with fp32 output, then the row kernels), forced here into
         several row chunks and vocabulary slices with a partial last slice;
stored   3 GEMMs with every logit gradient kept and dh, dW formed in backward, under an
         upstream gradient other than 1 (which backward folds into the operands);
chunked  3 GEMMs with each chunk's dh and dW formed in forward.
"""
import warnings

import pytest
import torch

import prefops
import prefops.chunks
import prefops.objective
from conftest import grad_tolerance, relative_error, value_tolerance
from helpers import make_inputs, reference64, run_with_grads
from prefops import fused, strategy
from prefops.memory import AllocationRecorder
from prefops.chunks import budget_bytes_per_logit
from test_objective_budget import bf16_store_error, float64_pipeline, head, problem, rounding_bound

BACKENDS = ["torch", "triton"]
N_ROWS, HIDDEN, VOCAB = 96, 35, 600
# plan_slices at this workspace: a quarter for 32 rows' h, dh and dh GEMM (12 bytes an element),
# the rest for slices of 256 columns: 600 = 256 + 256 + 88, rows cut to what a slice leaves.
SLICED_WORKSPACE = 4 * 32 * 12 * HIDDEN


def count_slices(monkeypatch):
    """Record (rows, v0) of every materialised slice."""
    calls, real = [], fused._linear_fp32

    def counting(h_rows, weight, bias, v0, v1):
        calls.append((h_rows.shape[0], v0))
        return real(h_rows, weight, bias, v0, v1)

    monkeypatch.setattr(fused, "_linear_fp32", counting)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", [{}, {"temperature": 0.8, "softcap": 12.0}], ids=str)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 4.0), (torch.float32, 60.0), (torch.bfloat16, 4.0)])
def test_sliced_logprobs_match_float64(backend, transform, dtype, scale, monkeypatch):
    hidden, weight, targets, bias = make_inputs(N_ROWS, HIDDEN, VOCAB, dtype=dtype, scale=scale, bias=True)
    upstream = [torch.randn(N_ROWS, dtype=torch.float64) for _ in range(3)]
    slices = count_slices(monkeypatch)
    with prefops.settings(workspace=SLICED_WORKSPACE, backend=backend):
        outs, grads = run_with_grads(prefops.linear_logprobs, hidden, weight, bias, targets, upstream,
                                     return_lse=True, return_entropy=True, **transform)
    assert strategy.last_path() == "sliced"
    # Forward and backward each cut the 72 counted rows into several chunks and 3 slices each.
    assert sum(v0 == 0 for _, v0 in slices) >= 4 and {v0 for _, v0 in slices} == {0, 256, 512}
    want, want_grads, sizes, logit_size = reference64(hidden, weight, bias, targets, upstream, return_lse=True,
                                                      return_entropy=True, **transform)
    for name, got, expected in zip(("logp", "lse", "entropy"), outs, want):
        assert relative_error(got, expected, scale=torch.full_like(expected, logit_size)) <= \
            value_tolerance(HIDDEN, VOCAB) * max(1.0, logit_size / 10), name
    for got, expected, size in zip(grads, want_grads, sizes):
        assert relative_error(got, expected, scale=size) <= grad_tolerance(dtype, HIDDEN, VOCAB, N_ROWS, logit_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 4.0), (torch.bfloat16, 4.0)])
@pytest.mark.parametrize("path", ["stored", "stored-split", "chunked", "sliced"])
def test_group_paths_match_float64(path, backend, dtype, scale, monkeypatch):
    """The DPO head through each of auto's paths, times an upstream gradient of 0.37."""
    hidden, weight, targets, bias, groups = problem(dtype, scale, bias=True)
    vocab, rows = weight.shape[0], int((targets != -100).sum())
    # stored: all logit gradients plus a pair's fp32 logits; stored-split: all logit gradients and
    # 5 rows' fp32 logits, so that chunks cut pairs (the head runs once after them); chunked: a pair's
    # logits and gradient tile (one pair a chunk); sliced: less than a pair's logits (chunks of 6 rows, 2 slices).
    if path == "stored-split":
        monkeypatch.setattr(prefops.chunks, "MIN_SPLIT_ROWS", 1)
    workspace = {"stored": 1 << 30, "stored-split": rows * vocab * weight.element_size() + 5 * vocab * 4,
                 "chunked": 2 * targets.shape[1] * vocab * budget_bytes_per_logit(dtype), "sliced": 12000}[path]
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    with prefops.settings(workspace=workspace, backend=backend):
        out = prefops.sequence_objective(leaves[0], leaves[1], targets, head=head, groups=groups, bias=leaves[2])
        assert strategy.last_path() == path.removesuffix("-split")
        grads = torch.autograd.grad(out.loss * 0.37, leaves)
    expected, expected_grads, logit_grad = float64_pipeline(hidden, weight, bias, targets, groups)
    assert relative_error(out.loss, expected) <= 1e-5
    expected_grads = [g * 0.37 for g in expected_grads]
    if dtype == torch.float32:
        for grad, want in zip(grads, expected_grads):
            assert relative_error(grad, want) <= 1e-5
        return
    # bf16: the gradient tile, then the GEMM's output (and for stored, h * 0.37 rounded once); the
    # chunked path's dW adds one rounding of the bf16 accumulator per chunk.
    unit = bf16_store_error(backend)
    roundings_w = {"stored": 3, "stored-split": 3, "chunked": 1 + groups.shape[0], "sliced": 2}[path]
    bound_h, bound_w = rounding_bound(logit_grad * 0.37, hidden, weight, unit, 2, roundings_w)
    assert (grads[0].double() - expected_grads[0]).norm() <= bound_h
    assert (grads[1].double() - expected_grads[1]).norm() <= bound_w
    assert relative_error(grads[2], expected_grads[2]) <= unit


def test_the_path_each_strategy_and_shape_takes():
    hidden, weight, targets, _, groups = problem(torch.bfloat16, 4.0, bias=False)
    counted = (targets != -100).sum(1)
    vocab, rows, largest = weight.shape[0], int(counted.sum()), int(counted[groups].sum(1).max())
    pair_logits = largest * vocab  # the largest group's counted rows set every chunk plan
    stored_bytes = rows * vocab * 2

    def path(**settings):
        with prefops.settings(**settings), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prefops.sequence_objective(hidden, weight, targets, head=head, groups=groups)
        return strategy.last_path(), [str(w.message) for w in caught]

    assert path() == ("stored", [])  # the default: 2 GiB holds everything here
    assert path(workspace=stored_bytes + pair_logits * 4) == ("stored", [])
    assert path(workspace=stored_bytes + pair_logits * 4 - 1) == ("chunked", [])
    assert path(workspace=pair_logits * 6) == ("chunked", [])
    assert path(workspace=pair_logits * 6 - 1) == ("sliced", [])
    assert path(strategy="sliced") == ("sliced", [])
    assert path(strategy="lean") == ("lean", [])
    assert path(strategy="budget", budget=pair_logits * 6) == ("chunked", [])
    ran, caught = path(strategy="budget", budget=pair_logits * 6 - 1)
    assert ran == "lean" and caught == ["a loss group does not fit the memory budget; using the lean strategy"]
    # Per-token ops have no groups: every strategy but lean runs them sliced.
    for name, expected in [("auto", "sliced"), ("budget", "sliced"), ("sliced", "sliced"), ("lean", "lean")]:
        prefops.linear_logprobs(hidden, weight, targets, strategy=name)
        assert strategy.last_path() == expected, name
    # A loss coupled across the batch (AOT) runs its one head on the sliced path under auto.
    loss = prefops.PreferenceLoss("aot", beta=0.1)
    loss(hidden, weight, targets, ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(3))
    assert strategy.last_path() == "sliced"


def test_bad_strategy_is_named():
    with pytest.raises(ValueError, match=r"strategy must be one of 'auto', 'budget', 'sliced', 'lean'; got 'fast'"):
        prefops.configure(strategy="fast")


def peak_beyond(fn):
    recorder = AllocationRecorder()
    with recorder:
        fn()
    return recorder.peak


MEMORY_PAIRS, MEMORY_LENGTH, MEMORY_HIDDEN, MEMORY_VOCAB = 8, 16, 32, 509
BLOCK_ROWS = 4  # rows of a stored chunk's elementwise passes on the PyTorch path, kept small here


@pytest.mark.parametrize("planted", [False, True], ids=["clean", "planted-leak"])
@pytest.mark.parametrize("path", ["stored", "sliced"])
def test_peak_within_the_workspace(path, planted, monkeypatch):
    """fp32, PyTorch backend, 8 pairs of 16 tokens. Forward and backward stay within the
    workspace plus the gradients and what grows with the tokens alone (gathered hidden rows and
    their dh, per-token vectors). Planted: every materialised chunk or slice of logits kept alive,
    as a loop that forgets to free them would."""
    generator = torch.Generator().manual_seed(5)
    n = 2 * MEMORY_PAIRS * MEMORY_LENGTH
    hidden = torch.randn(2 * MEMORY_PAIRS, MEMORY_LENGTH, MEMORY_HIDDEN, generator=generator).requires_grad_()
    weight = (torch.randn(MEMORY_VOCAB, MEMORY_HIDDEN, generator=generator) / 6).requires_grad_()
    targets = torch.randint(0, MEMORY_VOCAB, (2 * MEMORY_PAIRS, MEMORY_LENGTH), generator=generator)
    targets[:, :4] = -100
    groups = torch.stack([torch.arange(MEMORY_PAIRS), torch.arange(MEMORY_PAIRS) + MEMORY_PAIRS], 1)
    rows = int((targets != -100).sum())
    pair = 2 * (MEMORY_LENGTH - 4) * MEMORY_VOCAB * 4
    # stored: every logit gradient and two pairs' fp32 logits; sliced: less than one pair's logits
    # (plan_slices: chunks of 7 rows, slices of 256 columns).
    workspace = {"stored": rows * MEMORY_VOCAB * 4 + 2 * pair, "sliced": 40000}[path]
    monkeypatch.setattr(prefops.objective, "_BLOCK_ROWS", BLOCK_ROWS)
    if planted:
        owner, name = (prefops.chunks, "materialise") if path == "stored" else (fused, "_linear_fp32")
        kept, original = [], getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *args: kept.append(original(*args)) or kept[-1])
    with prefops.settings(workspace=workspace, backend="torch"):
        out = {}
        forward = peak_beyond(lambda: out.setdefault(
            "objective", prefops.sequence_objective(hidden, weight, targets, head=head, groups=groups)))
        assert strategy.last_path() == path
        backward = peak_beyond(lambda: out["objective"].loss.backward())
    grads = (hidden.numel() + weight.numel()) * 4
    # The PyTorch path's temporaries beyond the logits: a stored chunk's elementwise passes hold about
    # four fp32 blocks of BLOCK_ROWS rows; a slice's are inside the workspace (plan_slices counts 16
    # bytes an element on this path). Per-token vectors: 16 floats a token.
    temporaries = 4 * BLOCK_ROWS * MEMORY_VOCAB * 4 if path == "stored" else 0
    per_token = n * 64 + rows * MEMORY_HIDDEN * 4 * 3
    bounds = (workspace + temporaries + per_token, grads + workspace + temporaries + per_token)
    over = [(what, peak, bound) for what, peak, bound in zip(("forward", "backward"), (forward, backward), bounds)
            if peak > bound]
    assert bool(over) == planted, over or (forward, backward, bounds)


@pytest.mark.parametrize("path", ["stored", "chunked"])
def test_a_step_syncs_the_host_no_more_with_more_chunks(path):
    """A host sync inside the chunk loop stalls the GPU once per chunk: the H200 profile of
    2026-12-04 found the stored path's GPU work at the floor and its wall time 7 ms a step above
    it, from a boolean-mask scatter of the head's gradient in the loop. The syncs of a step,
    forward and backward, must be the same with one chunk as with three. On the Triton backend (the
    GPU's; the PyTorch tile math of the CPU backend has syncs of its own)."""
    from prefops.tools.opcount import OpCounter

    hidden, weight, targets, _, groups = problem(torch.float32, 4.0, bias=False)
    counted = (targets != -100).sum(1)
    vocab, rows, largest = weight.shape[0], int(counted.sum()), int(counted[groups].sum(1).max())
    # stored keeps every fp32 logit gradient beside the chunk; chunked writes the gradient over the logits.
    one_chunk, three_chunks = {"stored": (2 * rows * vocab * 4, rows * vocab * 4 + largest * vocab * 4),
                               "chunked": (rows * vocab * 4, largest * vocab * 4)}[path]

    def syncs(workspace):
        leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight)]
        with prefops.settings(workspace=workspace, backend="triton"), OpCounter() as count:
            prefops.sequence_objective(leaves[0], leaves[1], targets, head=head, groups=groups).loss.backward()
        assert strategy.last_path() == path
        return count

    single, several = syncs(one_chunk), syncs(three_chunks)
    assert len(several.syncs) == len(single.syncs), (single.summary(), several.summary())
    # And few: one read of the layout's bounds, one of the targets' range, one of the chunk plan.
    assert len(single.syncs) <= 3, single.summary()


INTERPRETER_OPS = {"aten.set_", "aten.empty", "aten.new_empty", "aten.copy_"}


def test_stored_path_runs_the_head_once():
    """The stored path keeps each row's logit gradient per unit of its upstream gradient and runs
    the head once after the chunk loop: the H200 profile of 2026-12-04 (third run) found 24.7 ms of
    GPU work against 28.6 ms of wall time a step at A, the host busy with the head and its autograd
    once a chunk. So a step with three chunks calls the head once and launches only the chunk
    loop's few ops per extra chunk, not the head's; chunked still needs the head once a chunk."""
    from prefops.tools.opcount import OpCounter

    hidden, weight, targets, _, groups = problem(torch.float32, 4.0, bias=False)
    counted = (targets != -100).sum(1)
    vocab, rows, largest = weight.shape[0], int(counted.sum()), int(counted[groups].sum(1).max())

    def step(workspace, path):
        calls = []

        def counting_head(*args):
            calls.append(args[1].numel())
            return head(*args)

        leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight)]
        with prefops.settings(workspace=workspace, backend="triton"), OpCounter() as count:
            prefops.sequence_objective(leaves[0], leaves[1], targets, head=counting_head, groups=groups).loss.backward()
        assert strategy.last_path() == path
        # The Triton interpreter's own tensor traffic (CPU only) is not the host's launches on a GPU.
        return calls, sum(op not in INTERPRETER_OPS for op in count.ops)

    one_calls, one_ops = step(2 * rows * vocab * 4, "stored")
    three_calls, three_ops = step(rows * vocab * 4 + largest * vocab * 4, "stored")
    assert one_calls == three_calls == [groups.shape[0]]
    # Per chunk: index_selects of h, targets, sequences and weights, the GEMM, the row statistics'
    # finishing ops and the sums: about 20 (the head and its autograd alone are more than 60).
    assert three_ops - one_ops <= 2 * 24, (one_ops, three_ops)
    chunked_calls, _ = step(largest * vocab * 4, "chunked")
    assert len(chunked_calls) == 3
