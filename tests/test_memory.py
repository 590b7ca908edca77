"""Memory is a feature: the peak of live bytes (allocated minus freed) while an op runs, inside
prefops' custom ops too, stays within the workspace or the budget on both backends.

Each bound is derived from the settings and stated beside its test; every check has a planted
leak (a chunk loop that keeps each chunk alive, the bug the settings exist to prevent) that
must trip it, so no check passes vacuously. Inputs are fp32: on CPU a half-precision GEMM
upcasts its operands (prefops.fused.matmul_fp32), temporaries a GPU run never makes.
"""
import gc

import pytest
import torch

import prefops
import prefops.kernels.logits_grad
import prefops.kernels.logits_stats
import prefops.kernels.token_kl_grad
import prefops.chunks
import prefops.objective
import prefops.token_kl
from prefops import fused
from prefops.memory import AllocationRecorder
from prefops.chunks import budget_bytes_per_logit
from prefops.token_kl import sequence_kl_objective

BACKENDS = ["torch", "triton"]
PLANTED = pytest.mark.parametrize("planted", [False, True], ids=["clean", "planted-leak"])
# A workspace that plan_chunks honours at these shapes (its 16-row and 16-column floors
# do not bind), far below the N x V logits a leak keeps.
WORKSPACE = 24 << 10
# Per-token vectors of a pass: the op's [N] outputs and their gradients, the counted rows'
# indices, targets and per-row statistics: at most 16 four-byte values a token.
PER_TOKEN_BYTES = 64
# Rows of materialised logits the budget strategy's PyTorch path handles per elementwise pass
# (prefops.objective._BLOCK_ROWS), set small so its temporaries stay far below one chunk...
BLOCK_ROWS = 4
# ...of which about four fp32 blocks per side are alive at once (prefops.fused.token_stats).
BLOCK_TEMPORARIES = 4
N_ROWS, HIDDEN, REF_HIDDEN, VOCAB = 96, 32, 24, 257
PAIRS, LENGTH, PROMPT = 6, 12, 4


def record(fn):
    recorder = AllocationRecorder()
    with recorder:
        result = fn()
    return recorder, result


def check_peaks(checks, planted):
    """checks: (what, recorder, bound in bytes). Clean: every peak within its bound; planted:
    some peak over it, or the check could not catch the leak it is there for."""
    over = [f"{what}: peak {recorder.peak} B > bound {bound} B; live at the peak:\n{recorder.describe_peak()}"
            for what, recorder, bound in checks if recorder.peak > bound]
    if planted:
        assert over, "a planted leak kept every peak within its bound: " + ", ".join(
            f"{what} {recorder.peak} <= {bound}" for what, recorder, bound in checks)
    else:
        assert not over, "\n".join(over)


def keep_results(monkeypatch, owner, name):
    """The planted bug: every result of owner.name stays alive, as in a chunk loop that appends
    each chunk's logits (or gradient tile) to a list."""
    original, kept = getattr(owner, name), []

    def keeping(*args, **kwargs):
        kept.append(original(*args, **kwargs))
        return kept[-1]

    monkeypatch.setattr(owner, name, keeping)


def fp32_inputs(n_rows, hidden_size, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, hidden_size, generator=g)
    weight = torch.randn(VOCAB, hidden_size, generator=g) / hidden_size**0.5
    return hidden, weight, g


def grad_bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


# The planted leak of each lean test: the fp32 logit tiles of the PyTorch path; on the Triton
# path (logits live in registers) the gradient tiles the launcher fills in backward.
LEAN_LEAKS = {"linear_logprobs": {"torch": (fused, "_linear_fp32"),
                                   "triton": (prefops.kernels.logits_grad, "launch_logits_grad")},
              "token_kl": {"torch": (fused, "_linear_fp32"),
                           "triton": (prefops.kernels.token_kl_grad, "launch_token_kl_grad")}}


@PLANTED
@pytest.mark.parametrize("backend", BACKENDS)
def test_lean_linear_logprobs_peak_within_the_workspace(backend, planted, monkeypatch):
    """Forward: the workspace (fp32 logit tiles), the counted rows' hidden states (gathered beside
    it, up to fused.token_stats' 1024-row chunk) and per-token vectors. Backward, above the
    gradients: the workspace (a row chunk's h, dh and GEMM result, one gradient tile) and
    per-token vectors. Beyond per-token vectors nothing grows with N."""
    if planted:
        keep_results(monkeypatch, *LEAN_LEAKS["linear_logprobs"][backend])
    hidden, weight, g = fp32_inputs(N_ROWS, HIDDEN, seed=0)
    targets = torch.randint(0, VOCAB, (N_ROWS,), generator=g)
    targets[::3] = -100
    counted = int((targets != -100).sum())
    hidden.requires_grad_()
    weight.requires_grad_()
    with prefops.settings(workspace=WORKSPACE, backend=backend, strategy="lean"):
        forward, loss = record(lambda: prefops.linear_logprobs(hidden, weight, targets).sum())
        backward, _ = record(loss.backward)
    per_token = N_ROWS * PER_TOKEN_BYTES
    check_peaks([("forward", forward, WORKSPACE + counted * HIDDEN * 4 + per_token),
                 ("backward", backward, grad_bytes(hidden, weight) + WORKSPACE + per_token)], planted)


@PLANTED
@pytest.mark.parametrize("backend", BACKENDS)
def test_lean_sequence_kl_peak_within_the_workspace(backend, planted, monkeypatch):
    """prefops.sequence_kl on prefops.linear_token_kl: the bounds of the lean log-prob op with
    both sides' hidden rows gathered in forward, and in backward a row chunk's reference rows."""
    if planted:
        keep_results(monkeypatch, *LEAN_LEAKS["token_kl"][backend])
    hidden, weight, g = fp32_inputs(N_ROWS, HIDDEN, seed=1)
    ref_hidden, ref_weight, _ = fp32_inputs(N_ROWS, REF_HIDDEN, seed=2)
    targets = torch.randint(0, VOCAB, (N_ROWS,), generator=g)
    targets[::3] = -100
    counted = int((targets != -100).sum())
    hidden.requires_grad_()
    weight.requires_grad_()
    seq_ids = torch.arange(N_ROWS) // 12
    with prefops.settings(workspace=WORKSPACE, backend=backend, strategy="lean"):
        forward, loss = record(lambda: prefops.sequence_kl(hidden, weight, ref_hidden, ref_weight, targets,
                                                           seq_ids=seq_ids).sum())
        backward, _ = record(loss.backward)
    per_token = N_ROWS * PER_TOKEN_BYTES
    row_chunk, _ = fused.plan_chunks(counted, VOCAB, HIDDEN, 4, WORKSPACE)
    check_peaks([("forward", forward, WORKSPACE + counted * (HIDDEN + REF_HIDDEN) * 4 + per_token),
                 ("backward", backward, grad_bytes(hidden, weight) + WORKSPACE + row_chunk * REF_HIDDEN * 4
                  + per_token)], planted)


@PLANTED
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_diagnostics_peak_within_the_workspace(backend, planted, monkeypatch):
    """Forward only: the workspace plus the gathered hidden rows plus per-token vectors, the
    top-k logits and ids (12 bytes each) among them, kept twice (scattered copy). The Triton
    pass's planted bug materialises the logits of its rows, what the fused pass exists to avoid."""
    top_k = 4
    if planted and backend == "torch":
        keep_results(monkeypatch, fused, "_linear_fp32")
    if planted and backend == "triton":
        original = prefops.kernels.logits_stats.launch_logits_stats
        kept = []

        def materialising(hidden, weight, bias, rows, *args, **kwargs):
            kept.append(hidden.index_select(0, rows) @ weight.t())
            return original(hidden, weight, bias, rows, *args, **kwargs)

        monkeypatch.setattr(prefops.kernels.logits_stats, "launch_logits_stats", materialising)
    hidden, weight, g = fp32_inputs(N_ROWS, HIDDEN, seed=3)
    targets = torch.randint(0, VOCAB, (N_ROWS,), generator=g)
    targets[::3] = -100
    counted = int((targets != -100).sum())
    with prefops.settings(workspace=WORKSPACE, backend=backend, strategy="lean"):
        forward, _ = record(lambda: prefops.linear_diagnostics(hidden, weight, targets, top_k=top_k))
    per_token = N_ROWS * (PER_TOKEN_BYTES + 2 * 12 * top_k)
    check_peaks([("forward", forward, WORKSPACE + counted * HIDDEN * 4 + per_token)], planted)


def pair_batch(seed, hidden_size=HIDDEN):
    """PAIRS chosen/rejected pairs of LENGTH tokens (PROMPT ignored), as a padded batch."""
    hidden, weight, g = fp32_inputs(2 * PAIRS * LENGTH, hidden_size, seed)
    targets = torch.randint(0, VOCAB, (2 * PAIRS, LENGTH), generator=g)
    targets[:, :PROMPT] = -100
    groups = torch.stack([torch.arange(PAIRS), torch.arange(PAIRS) + PAIRS], 1)
    return hidden.view(2 * PAIRS, LENGTH, hidden_size), weight, targets, groups


def dpo_head(logps, group_index, stats):
    margin = logps[:, 0] - logps[:, 1] - stats.get("kl", torch.zeros_like(logps))[:, 0]
    return -torch.nn.functional.logsigmoid(0.1 * margin).sum()


def budget_bounds(budget, sides, gathered_width, grads):
    """Forward: the gradients (formed there), one chunk of logits (the budget), the chunk's
    gathered hidden rows and the fp32 result of its dh GEMM, the PyTorch path's row-block
    temporaries, per-token vectors. Backward: the gradients scaled by the upstream gradient."""
    chunk_rows = budget // (VOCAB * budget_bytes_per_logit(torch.float32, sides))
    per_token = 2 * PAIRS * LENGTH * PER_TOKEN_BYTES
    forward = (grads + budget + chunk_rows * (gathered_width + HIDDEN) * 4
               + sides * BLOCK_TEMPORARIES * BLOCK_ROWS * VOCAB * 4 + per_token)
    return forward, grads + per_token


@PLANTED
@pytest.mark.parametrize("backend", BACKENDS)
def test_budget_objective_peak_within_the_budget(backend, planted, monkeypatch):
    """sequence_objective(strategy='budget') with a budget of two pairs' logits: three chunks."""
    monkeypatch.setattr(prefops.objective, "_BLOCK_ROWS", BLOCK_ROWS)
    if planted:
        keep_results(monkeypatch, prefops.chunks, "materialise")
    hidden, weight, targets, groups = pair_batch(seed=4)
    hidden.requires_grad_()
    weight.requires_grad_()
    budget = 2 * 2 * (LENGTH - PROMPT) * VOCAB * budget_bytes_per_logit(torch.float32)
    with prefops.settings(backend=backend):
        forward, loss = record(lambda: prefops.sequence_objective(
            hidden, weight, targets, head=dpo_head, groups=groups, strategy="budget", budget=budget).loss)
        backward, _ = record(loss.backward)
    forward_bound, backward_bound = budget_bounds(budget, 1, HIDDEN, grad_bytes(hidden, weight))
    check_peaks([("forward", forward, forward_bound), ("backward", backward, backward_bound)], planted)


@PLANTED
@pytest.mark.parametrize("backend", BACKENDS)
def test_budget_sequence_kl_objective_peak_within_the_budget(backend, planted, monkeypatch):
    """sequence_kl_objective(strategy='budget'): both sides' logits of two pairs per chunk."""
    monkeypatch.setattr(prefops.objective, "_BLOCK_ROWS", BLOCK_ROWS)
    monkeypatch.setattr(prefops.token_kl, "_BLOCK_ROWS", BLOCK_ROWS)
    if planted:
        keep_results(monkeypatch, prefops.token_kl, "materialise")
    hidden, weight, targets, groups = pair_batch(seed=5)
    ref_hidden, ref_weight, _, _ = pair_batch(seed=6, hidden_size=REF_HIDDEN)
    hidden.requires_grad_()
    weight.requires_grad_()
    budget = 2 * 2 * (LENGTH - PROMPT) * VOCAB * budget_bytes_per_logit(torch.float32, sides=2)
    with prefops.settings(backend=backend):
        forward, loss = record(lambda: sequence_kl_objective(
            hidden, weight, ref_hidden, ref_weight, targets, head=dpo_head, groups=groups, strategy="budget",
            budget=budget).loss)
        backward, _ = record(loss.backward)
    forward_bound, backward_bound = budget_bounds(budget, 2, HIDDEN + REF_HIDDEN, grad_bytes(hidden, weight))
    check_peaks([("forward", forward, forward_bound), ("backward", backward, backward_bound)], planted)


def test_recorder_counts_allocations_frees_views_in_place_ops_and_aliases():
    recorder = AllocationRecorder()
    with recorder:
        a = torch.empty(1000)
        view = a.view(10, 100)
        a.add_(1)
        assert recorder.live == 4000, "a view or an in-place result allocates nothing"
        b = a * 2
        del b
        assert (recorder.live, recorder.peak) == (4000, 8000), "a freed result leaves the live bytes"
        grown = torch.empty(0)
        torch.mm(torch.ones(2, 3), torch.ones(3, 4), out=grown)
        assert recorder.live == 4000 + 32, "an out= result allocates its size"
        grown.resize_(500)
        assert recorder.live == 6000, "growing a storage in place allocates the growth"
        alias = torch.empty(0).set_(a.untyped_storage())
        assert recorder.live == 6000, "a tensor on an existing storage allocates nothing"
        del a, alias
        assert recorder.live == 6000, "the view keeps the storage alive"
        del view, grown
    assert (recorder.live, recorder.peak) == (0, 8000)


def test_recorder_sees_inside_custom_ops_and_their_frees():
    """prefops::linear_logprobs is one opaque op to a dispatch mode: the recorder steps inside,
    sees its fp32 tiles (the workspace's worth) and their frees."""
    hidden, weight, g = fp32_inputs(N_ROWS, HIDDEN, seed=7)
    targets = torch.randint(0, VOCAB, (N_ROWS,), generator=g)
    with prefops.settings(workspace=WORKSPACE, backend="torch", strategy="lean"):
        recorder, logp = record(lambda: prefops.linear_logprobs(hidden, weight, targets))
    assert recorder.peak >= WORKSPACE, recorder.describe_peak()
    assert recorder.live == N_ROWS * 4, "only the returned log-probs outlive the op"
    del logp
    assert recorder.live == 0


def test_recorder_sees_triton_launches_and_collects_their_garbage():
    """A launcher's torch.empty is seen. The interpreter leaves each launch's arguments in a
    reference cycle: the recorder collects it before counting a new peak, so launches that
    each fill and drop a buffer peak at one buffer, not at one per launch."""
    hidden, weight, g = fp32_inputs(N_ROWS, HIDDEN, seed=8)
    rows = torch.arange(N_ROWS)
    targets = torch.randint(0, VOCAB, (N_ROWS,), generator=g, dtype=torch.int32)
    per_row = torch.zeros(N_ROWS)
    recorder = AllocationRecorder()
    with recorder:
        for _ in range(3):
            out = torch.empty(N_ROWS, VOCAB)
            prefops.kernels.logits_grad.launch_logits_grad(hidden, weight, None, rows, targets, per_row, None,
                                                           per_row, per_row, None, 1.0, None, 0, out)
            del out
        prefops.kernels.logits_stats.launch_logits_stats(hidden, weight, None, rows, targets, 1.0, None)
    assert recorder.peak == N_ROWS * VOCAB * 4, recorder.describe_peak()
    assert any(op == "aten.empty.memory_format" and numel % (6 * N_ROWS) == 0 for _, numel, op in recorder.sizes), \
        "the statistics launcher's output buffer was not seen"
    gc.collect()
    assert recorder.live == 0


@pytest.mark.parametrize("n,vocab,hidden,workspace", [
    (5325, 128256, 4096, 160 << 20),   # shape A's counted rows at the default workspace
    (21299, 128256, 4096, 160 << 20),  # shape L
    (5325, 152064, 3584, 64 << 20),
    (40, 1013, 67, 1 << 16),           # a tiny workspace: 16-column tiles
])
def test_gradient_tiles_fit_the_workspace_and_keep_16_byte_rows(n, vocab, hidden, workspace):
    """Each side of the backward plan stays within half the workspace, and a tile narrower than
    the vocabulary has a row stride the gradient kernel can store 16 bytes at a time."""
    row_chunk, v_chunk = fused.plan_chunks(n, vocab, hidden, 2, workspace)
    assert row_chunk * hidden * 12 <= workspace // 2 or row_chunk == 16
    assert row_chunk * v_chunk * 2 <= workspace // 2
    if v_chunk < vocab:
        assert v_chunk % (256 if v_chunk >= 256 else 16) == 0
