"""Forward: online-softmax statistics of the logits of the counted tokens.

For each counted row r and each vocabulary split, streaming over vocabulary
blocks without storing any logits:
    m = max z,  s = sum exp(z - m),  a = sum exp(z - m)(z - m),
    q = sum exp(2(z - m)),  t = z[target_r],  u = sum z
(see prefops/tiles.py for how they turn into log p, lse, entropy, sum p^2,
the mean logit u / V and top-1 = (t >= m)). u is a plain sum: no rescaling
when the running max moves, one add per logit.
Only m, s and t are always kept: ENTROPY, SUM_P2 and LOGIT_SUM switch a, q and u
on. With them off (the training path, log p alone) a 128 x 128 tile at 8 warps
compiles for sm_90 to half the fp32 adds and FMAs per tile (202 against 408 in
SASS) and 8 bytes of spilled registers instead of 88.
With TOP_K > 0 (forward-only diagnostics) the same tiles also feed a running
top-k of the logits per row (kernels/topk_stats.py); TOP_K = 0 compiles that
code away, so the training path pays nothing for it.

Stores for backward: nothing here; the caller keeps lse and entropy per row
(8 bytes a token). Backward recomputes the logits blockwise.

Cost: 2 * N * V * H FLOPs (one GEMM over the counted rows only) plus a few
elementwise ops (one exp) per logit; reads h once per vocabulary split and W
once per row block (L2 absorbs most re-reads); writes 6 * N * splits floats
(+ 2 * TOP_K * N * splits values and ids).
"""
import triton
import triton.language as tl

from .config import interpreting, stats_configs, tuned, vocabulary_splits
from .logits_tile import counted_row_block, logits_tile
from .online_softmax import EMPTY, softmax_fold
from .topk_stats import topk_init, topk_update


@triton.autotune(configs=stats_configs(), key=["hidden_size", "vocab_size", "IEEE", "TOP_K", "ENTROPY", "SUM_P2",
                                                 "LOGIT_SUM"])
@triton.jit
def logits_stats_kernel(h_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, out_ptr, top_ptr, top_ids_ptr,
                        n_rows, vocab_size, hidden_size, stride_h, stride_w, v_per_split, splits,
                        inv_temperature, softcap,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                        ENTROPY: tl.constexpr, SUM_P2: tl.constexpr, LOGIT_SUM: tl.constexpr,
                        TOP_K: tl.constexpr, TOP_KP: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_s = tl.program_id(1)
    offs_n, row_mask, rows, targets = counted_row_block(rows_ptr, targets_ptr, n_rows, BLOCK_N)

    m = tl.full((BLOCK_N,), EMPTY, dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    q = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if TOP_K > 0:
        top, top_ids = topk_init(BLOCK_N, TOP_K, TOP_KP)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, vocab_size)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        z = logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, hidden_size, stride_h, stride_w,
                        inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        m, s, a, q = softmax_fold(z, v_mask[None, :], m, s, a, q, ENTROPY, SUM_P2)
        t += tl.sum(tl.where(offs_v[None, :] == targets[:, None], z, 0.0), axis=1)
        if LOGIT_SUM:
            u += tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)
        if TOP_K > 0:
            top, top_ids = topk_update(top, top_ids, z, offs_v, row_mask[:, None] & v_mask[None, :], TOP_K, TOP_KP)

    out = out_ptr + offs_n * splits + pid_s
    plane = n_rows * splits
    tl.store(out, m, mask=row_mask)
    tl.store(out + plane, s, mask=row_mask)
    tl.store(out + 2 * plane, a, mask=row_mask)
    tl.store(out + 3 * plane, q, mask=row_mask)
    tl.store(out + 4 * plane, t, mask=row_mask)
    tl.store(out + 5 * plane, u, mask=row_mask)
    if TOP_K > 0:
        slots = tl.arange(0, TOP_KP)
        at = (offs_n * splits + pid_s)[:, None] * TOP_K + slots[None, :]
        keep = row_mask[:, None] & (slots[None, :] < TOP_K)
        tl.store(top_ptr + at, top, mask=keep)
        tl.store(top_ids_ptr + at, top_ids, mask=keep)


def launch_logits_stats(hidden, weight, bias, rows, targets, temperature, softcap, top_k=0,
                        extras=(True, True, True)):
    """Run the kernel for the counted rows; returns partial Stats of shape [n, splits].
    extras: (entropy, sum_p2, logit_sum) statistics to accumulate; the others stay at their initial 0.

    With top_k > 0 returns (Stats, values [n, splits, top_k], ids [n, splits, top_k]): the
    top-k logits of each split (slots a split cannot fill hold -1e38 and id -1)."""
    import torch

    from ..tiles import Stats

    n = rows.numel()
    vocab, hidden_size = weight.shape
    splits, v_per_split = vocabulary_splits(n, vocab, hidden.device)
    out = torch.empty((6, n, splits), device=hidden.device, dtype=torch.float32)
    # Without top-k the kernel never touches these pointers: out stands in for them.
    top = torch.empty((n, splits, top_k), device=hidden.device, dtype=torch.float32) if top_k else out
    top_ids = torch.empty((n, splits, top_k), device=hidden.device, dtype=torch.int32) if top_k else out
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
    tuned(logits_stats_kernel)[grid](
        hidden, weight, bias if bias is not None else weight, rows, targets, out, top, top_ids,
        n, vocab, hidden_size, hidden.stride(0), weight.stride(0), v_per_split, splits,
        1.0 / temperature, softcap or 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        IEEE=hidden.dtype == torch.float32 or interpreting(), UPCAST=interpreting(),
        ENTROPY=extras[0], SUM_P2=extras[1], LOGIT_SUM=extras[2],
        TOP_K=top_k, TOP_KP=triton.next_power_of_2(max(top_k, 1)),
    )
    stats = Stats(*out.unbind(0))
    return (stats, top, top_ids) if top_k else stats
