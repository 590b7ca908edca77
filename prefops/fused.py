"""Chunk scheduling for the fused linear log-prob op, on either backend.

Only counted rows (targets != ignore_index) are ever multiplied with W. Memory
beyond the gradients is bounded by `workspace`, whatever N is:
  forward  - per-row statistics only (the Triton kernel keeps logits in registers;
             the PyTorch backend materialises one bounded fp32 tile at a time);
             logits are fp32 results of input-dtype operands on both backends;
  backward - rows are taken in chunks whose gathered h, fp32 dh accumulator and
             fp32 GEMM result fit half the workspace; within a chunk the vocabulary is cut into tiles of
             d(hW^T) that fill the rest. Each tile feeds two GEMMs (dh += G W_v,
             dW_v += G^T h), so dW sums a whole row chunk in fp32 inside one GEMM
             and meets the other row chunks once per chunk.
"""
from __future__ import annotations

import math
import os

import torch

from . import tiles

def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package; pip install triton")
        if device.type != "cuda":
            if os.environ.get("TRITON_INTERPRET", "0") != "1":
                raise ValueError(
                    "backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before prefops is imported; "
                    "use backend='torch' or 'auto' for the CPU path"
                )
            check_interpreter_versions()
    return backend


def check_interpreter_versions() -> None:
    """triton 3.6's CPU interpreter fails on every kernel launch with numpy >= 2.4 ("only
    0-dimensional arrays can be converted to Python scalars"); triton 3.7 fixed it. Say so
    before a launch fails with that message."""
    import numpy
    import triton

    from .versions import release

    if release(triton.__version__) < (3, 7) and release(numpy.__version__) >= (2, 4):
        raise RuntimeError(f"triton {triton.__version__}'s CPU interpreter (TRITON_INTERPRET=1) does not work with "
                           f"numpy {numpy.__version__}: install 'numpy<2.4' or 'triton>=3.7'")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def counted_rows(targets: torch.Tensor, ignore_index: int):
    rows = (targets != ignore_index).nonzero().squeeze(1)
    return rows, targets.index_select(0, rows).to(torch.int32)


def _linear_fp32(h_rows, weight, bias, v0, v1):
    """fp32 (h W[v0:v1]^T + b) from operands in the input dtype: one cuBLAS GEMM with fp32 output on CUDA."""
    linear = matmul_fp32(h_rows, weight[v0:v1].t())
    return linear if bias is None else linear.add_(bias[v0:v1].float())


def plan_slices(n: int, vocab: int, hidden_size: int, tile_bytes_per_element: int, workspace: int,
                row_bytes_per_element: int = 12):
    """Rows per chunk and vocabulary columns per slice of the sliced path (materialised GEMM slices).

    row_bytes_per_element: what a row holds per hidden element (its gathered h, and in backward
    its fp32 dh accumulator, plus on CPU the fp32 result of each dh GEMM). All rows at once where
    that takes at most half the workspace, so that every slice's dW comes from one GEMM over all
    rows and is written once; the slices take the rest. A slice narrower than the vocabulary is a
    multiple of 256 columns, for 16-byte row strides."""
    row_chunk = max(1, min(max(n, 1), workspace // 2 // (row_bytes_per_element * hidden_size)))
    tile_space = workspace - row_chunk * row_bytes_per_element * hidden_size
    v_chunk = max(256, min(vocab, tile_space // (row_chunk * tile_bytes_per_element)))
    if v_chunk < vocab:
        v_chunk = v_chunk // 256 * 256
    v_chunk = min(v_chunk, vocab)
    row_chunk = max(1, min(row_chunk, tile_space // (v_chunk * tile_bytes_per_element)))
    return row_chunk, v_chunk


def token_stats(hidden, weight, bias, rows, targets, temperature, softcap, backend, workspace, top_k=0,
                extras=(True, True, True), sliced=False, finalize=True):
    """log p(target), lse, entropy, sum p^2, sum of the logits and top-1 for the counted rows, as a tiles.Token.

    extras: whether entropy, sum p^2 and the logit sum are wanted; the Triton kernel
    skips the others (their values are then meaningless), the PyTorch path computes them anyway.
    sliced: materialise fp32 logit slices with a GEMM (cuBLAS on CUDA) and fold their statistics
    (the row kernel on the Triton backend) instead of the lean fused kernel.

    With top_k > 0, returns (Token, top-k logits [n, k] descending, their ids [n, k] int64)
    from the same pass over the vocabulary.
    finalize: False returns the raw tiles.Stats in place of the Token, for a caller that merges them
    with other vocabulary ranges first (prefops.vocab_parallel)."""
    n, vocab = rows.numel(), weight.shape[0]
    finish = tiles.finalize if finalize else (lambda stats: stats)
    if sliced:
        return _sliced_stats(hidden, weight, bias, rows, targets, temperature, softcap, backend, workspace, top_k,
                             finish)
    if backend == "triton" and n:
        from .kernels.logits_stats import launch_logits_stats

        if not top_k:
            return finish(tiles.combine_splits(
                launch_logits_stats(hidden, weight, bias, rows, targets, temperature, softcap, extras=extras)))
        partial, values, ids = launch_logits_stats(hidden, weight, bias, rows, targets, temperature, softcap,
                                                   top_k=top_k, extras=extras)
        values, pick = values.flatten(1).topk(top_k, dim=1)
        return finish(tiles.combine_splits(partial)), values, ids.flatten(1).gather(1, pick).long()
    # About four fp32 temporaries of the tile are alive at once.
    row_chunk = max(1, min(n, 1024))
    v_chunk = max(1, min(vocab, workspace // (16 * row_chunk)))
    return _materialised_stats(hidden, weight, bias, rows, targets, temperature, softcap, False, row_chunk, v_chunk,
                               top_k, finish)


def _sliced_stats(hidden, weight, bias, rows, targets, temperature, softcap, backend, workspace, top_k, finish):
    n, (vocab, hidden_size) = rows.numel(), weight.shape
    rows_kernel = backend == "triton"
    # fp32 logits, plus on the PyTorch path about three fp32 temporaries, plus z for a top-k.
    bytes_per = (4 if rows_kernel else 16) + (4 if top_k else 0)
    row_chunk, v_chunk = plan_slices(n, vocab, hidden_size, bytes_per, workspace, hidden.element_size())
    return _materialised_stats(hidden, weight, bias, rows, targets, temperature, softcap, rows_kernel, row_chunk,
                               v_chunk, top_k, finish)


def _materialised_stats(hidden, weight, bias, rows, targets, temperature, softcap, rows_kernel, row_chunk, v_chunk,
                        top_k, finish):
    """Statistics of the counted rows from fp32 logit slices [row_chunk, v_chunk] materialised by a GEMM,
    folded by the row kernel (rows_kernel) or by the PyTorch tile math."""
    n, vocab = rows.numel(), weight.shape[0]
    parts = []
    for r0 in range(0, n, row_chunk):
        h_rows = hidden.index_select(0, rows[r0:r0 + row_chunk])
        local = targets[r0:r0 + row_chunk]
        stats = tiles.empty_stats(h_rows.shape[0], hidden.device)
        top = tiles.empty_top_k(h_rows.shape[0], top_k, hidden.device)
        for v0 in range(0, vocab, v_chunk):
            linear = _linear_fp32(h_rows, weight, bias, v0, v0 + v_chunk)
            if rows_kernel:
                from .kernels.rows_stats import launch_rows_stats

                stats = tiles.combine(stats, launch_rows_stats(linear, local - v0, temperature, softcap))
                z = tiles.transform(linear, temperature, softcap) if top_k else None
            else:
                z = tiles.transform(linear, temperature, softcap)
                stats = tiles.combine(stats, tiles.tile_stats(z, local - v0))
            del linear
            if top_k:
                top = tiles.merge_top_k(top, z, v0)
            del z
        parts.append((finish(stats), *top))
    if not parts:
        parts.append((finish(tiles.empty_stats(0, hidden.device)), *tiles.empty_top_k(0, top_k, hidden.device)))
    tokens, values, ids = zip(*parts)
    token = type(tokens[0])(*(torch.cat(column) for column in zip(*tokens)))
    return (token, torch.cat(values), torch.cat(ids)) if top_k else token


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result, accumulating in fp32 for half-precision inputs.

    On CUDA one half-precision GEMM writes fp32 (torch >= 2.10 has out_dtype; a failure
    is raised, never hidden behind a 10x slower fp32 GEMM). CPU matmul has no out_dtype;
    upcasting half values to fp32 is exact, so its fp32 GEMM is the same arithmetic."""
    if a.dtype == b.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        if a.dtype != b.dtype:
            raise TypeError(f"matmul_fp32 needs operands of one dtype; got {a.dtype} and {b.dtype}")
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for an fp32 acc: on CUDA one GEMM that reads and writes acc (no fp32 temporary
    of acc's size); on CPU through matmul_fp32."""
    if a.is_cuda and a.dtype != torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += matmul_fp32(a, b)


class WeightGrad:
    """dW accumulated across row chunks: in fp32 when asked (or when W is fp32), else in
    W's dtype with one fp32-arithmetic rounding per row chunk."""

    def __init__(self, weight: torch.Tensor, fp32: bool, written_whole: bool = False):
        """written_whole: the first row chunk writes every vocabulary row (add(..., first=True)), so
        the buffer needs no zero fill."""
        dtype = torch.float32 if fp32 else weight.dtype
        self.out_dtype = weight.dtype
        allocate = torch.empty if written_whole else torch.zeros
        self.value = allocate(weight.shape, device=weight.device, dtype=dtype)

    def add(self, v0: int, v1: int, tile: torch.Tensor, h_rows: torch.Tensor, first: bool = False) -> None:
        """dW[v0:v1] += tile^T h_rows; first: the rows' first contribution, written without reading."""
        target = self.value[v0:v1]
        if target.dtype == tile.dtype == h_rows.dtype:
            if first:
                torch.mm(tile.t(), h_rows, out=target)
            else:
                target.addmm_(tile.t(), h_rows)
        elif first:
            target.copy_(matmul_fp32(tile.t(), h_rows))
        else:
            target.add_(matmul_fp32(tile.t(), h_rows).to(target.dtype))

    def result(self) -> torch.Tensor:
        return self.value.to(self.out_dtype)


def plan_chunks(n: int, vocab: int, hidden_size: int, tile_bytes_per_element: int, workspace: int):
    """Rows per chunk and vocabulary columns per tile, each side taking half the workspace.

    Per (row, hidden) element a chunk holds the gathered h (<= 4 bytes), the fp32 dh
    accumulator and the fp32 result of one dh GEMM: 12 bytes.
    A tile narrower than the vocabulary is a multiple of 256 columns (16 when the workspace
    is tiny), so its row stride lets the gradient kernel store 16 bytes at a time."""
    row_chunk = max(16, min(max(n, 1), workspace // 2 // (12 * hidden_size)))
    v_chunk = max(16, min(vocab, (workspace // 2) // (row_chunk * tile_bytes_per_element)))
    if v_chunk < vocab:
        align = 256 if v_chunk >= 256 else 16
        v_chunk = max(16, v_chunk // align * align)
    # Where the 16-column floor binds (a tiny workspace), fewer rows keep the tile within its half.
    row_chunk = max(1, min(row_chunk, (workspace // 2) // (v_chunk * tile_bytes_per_element)))
    return row_chunk, v_chunk


def token_grads(hidden, weight, bias, rows, targets, lse, entropy, grad_logp, grad_lse, grad_entropy,
                temperature, softcap, backend, workspace, fp32_weight_grad, needs, sliced=False):
    """Gradients of sum_r (g_logp logp_r + g_lse lse_r + g_ent H_r) for the counted rows.

    sliced: each tile's logits are recomputed by a GEMM with fp32 output (cuBLAS on CUDA) and the
    row kernel writes their gradient (the 4-GEMM path); else the lean fused kernel recomputes them."""
    # The row kernel has no entropy term; a differentiated entropy takes the PyTorch tile math.
    rows_kernel = sliced and backend == "triton" and grad_entropy is None

    def tile(chunk, chunk_rows, h_rows, v0, v1):
        if rows_kernel:
            from .kernels.rows_grad import launch_rows_grad

            linear = _linear_fp32(h_rows, weight, bias, v0, v1)
            out = torch.empty(chunk_rows.numel(), v1 - v0, device=hidden.device, dtype=hidden.dtype)
            return launch_rows_grad(linear, out, targets[chunk] - v0, lse[chunk], grad_logp[chunk], grad_lse[chunk],
                                    temperature, softcap)
        if backend == "triton" and not sliced:
            from .kernels.logits_grad import launch_logits_grad

            out = torch.empty(chunk_rows.numel(), v1 - v0, device=hidden.device, dtype=hidden.dtype)
            return launch_logits_grad(hidden, weight, bias, chunk_rows, targets[chunk], lse[chunk],
                                      _part(entropy, chunk), grad_logp[chunk], grad_lse[chunk],
                                      _part(grad_entropy, chunk), temperature, softcap, v0, out)
        z, slope = tiles.transform_with_slope(_linear_fp32(h_rows, weight, bias, v0, v1), temperature, softcap)
        # Rounded to the input dtype as the Triton kernel stores it, so both backends feed
        # the dh and dW GEMMs the same operands.
        return tiles.tile_grad(z, targets[chunk] - v0, lse[chunk], _part(entropy, chunk), grad_logp[chunk],
                               grad_lse[chunk], _part(grad_entropy, chunk), slope).to(hidden.dtype)

    if rows_kernel:
        tile_bytes = 4 + weight.element_size()  # the fp32 recomputed slice and its gradient
    else:
        tile_bytes = weight.element_size() if backend == "triton" and not sliced else 16
    plan = sliced_backward_plan(hidden) if sliced else plan_chunks
    return linear_grads(hidden, weight, bias, rows, tile, tile_bytes, workspace, fp32_weight_grad, needs, plan=plan)


def sliced_backward_plan(hidden, gathered_width=None):
    """plan_slices for linear_grads on the sliced path. Per hidden element a row holds its gathered
    rows (h, and for the token KL the reference's: gathered_width elements in all, default H), its
    fp32 dh accumulator and, on CPU, the fp32 result of each dh GEMM."""
    width = hidden.shape[-1]
    row_bytes = math.ceil(hidden.element_size() * (gathered_width or width) / width) + 4 + (
        0 if hidden.is_cuda else 4)
    return lambda *args: plan_slices(*args, row_bytes_per_element=row_bytes)


def linear_grads(hidden, weight, bias, rows, logit_grad_tile, tile_bytes, workspace, fp32_weight_grad, needs,
                 plan=None):
    """dh, dW, db of a loss whose gradient with respect to the linear output hW^T + b of the
    counted rows comes tile by tile from logit_grad_tile(chunk, chunk_rows, h_rows, v0, v1)
    (chunk: a slice of `rows`; h_rows: their gathered hidden states) -> [len(chunk_rows), v1 - v0].

    tile_bytes: workspace bytes per tile element (the tile and the temporaries that build it).
    plan: (n, vocab, hidden, tile_bytes, workspace) -> (rows per chunk, columns per tile);
    plan_chunks by default."""
    need_h, need_w, need_b = needs
    n, (vocab, hidden_size) = rows.numel(), weight.shape
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = WeightGrad(weight, fp32_weight_grad or weight.dtype == torch.float32, written_whole=n > 0) \
        if need_w else None
    grad_b = torch.zeros(vocab, device=hidden.device, dtype=torch.float32) if need_b else None
    row_chunk, v_chunk = (plan or plan_chunks)(n, vocab, hidden_size, tile_bytes, workspace)
    for r0 in range(0, n, row_chunk):
        chunk = slice(r0, r0 + row_chunk)
        chunk_rows = rows[chunk]
        h_rows = hidden.index_select(0, chunk_rows)
        dh = torch.zeros(chunk_rows.numel(), hidden_size, device=hidden.device) if need_h else None
        for v0 in range(0, vocab, v_chunk):
            v1 = min(v0 + v_chunk, vocab)
            tile = logit_grad_tile(chunk, chunk_rows, h_rows, v0, v1)
            if need_h:
                accumulate_fp32(dh, tile, weight[v0:v1])
            if need_w:
                grad_w.add(v0, v1, tile, h_rows, first=r0 == 0)
            if need_b:
                grad_b[v0:v1] += tile.sum(0, dtype=torch.float32)
            del tile  # else it stays alive while the next tile is built: two tiles in the workspace
        if need_h:
            grad_h.index_copy_(0, chunk_rows, dh.to(hidden.dtype))
    return (grad_h, grad_w.result() if need_w else None, grad_b.to(bias.dtype) if need_b else None)


def _part(value, chunk):
    return None if value is None else value[chunk]
