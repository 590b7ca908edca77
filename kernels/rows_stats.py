"""Budget strategy, forward: online-softmax statistics of logits that already sit in memory.

For each row r of a materialised logits chunk L [n, V] (the output of one GEMM),
with z = softcap * tanh(L / temperature / softcap):
    m = max z,  s = sum exp(z - m),  a = sum exp(z - m)(z - m),
    q = sum exp(2(z - m)),  t = z[target_r],  u = sum z
(prefops/tiles.py turns them into log p, lse, entropy, sum p^2, the mean logit
u / V and top-1 = (t >= m)). u is a plain sum, never rescaled.

Stores: 6 floats a row; nothing else. The gradient kernel (rows_grad.py) reads
the logits again and overwrites them with d loss / dL in place.

Cost: ~9 n V elementwise FLOPs and n V exps; reads n V elements once (4 bytes each
for the fp32 GEMM output), writes 24 n bytes; memory-bound on an H200 (~0.8 ms for
5328 x 128256 fp32 logits at 3.5 TB/s). The running state is six scalars, rescaled
once a block after a block-wide max, and the target logit is one load: an earlier
version kept the state per lane (two exps and ~30 operations an element, ~150
registers a thread, one program an SM) and ran at 1.7 TB/s (H200, 2026-12-04).
"""
import triton
import triton.language as tl

from .config import forced_block, interpreting, row_block, row_configs, tuned
from .logits_tile import transform
from .online_softmax import EMPTY, softmax_fold


# The block and warps that keep enough loads in flight are the device's call.
@triton.autotune(configs=row_configs(), key=["vocab_size", "HAS_SOFTCAP"])
@triton.jit
def rows_stats_kernel(logits_ptr, targets_ptr, out_ptr, n_rows, vocab_size, stride_row, inv_temperature, softcap,
                      HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    target = tl.load(targets_ptr + row)
    # A target beyond the row (a later vocabulary slice's) contributes no logit here.
    in_row = (target >= 0) & (target < vocab_size)
    t = tl.where(in_row, transform(tl.load(base + target, mask=in_row, other=0.0), inv_temperature, softcap,
                                   HAS_SOFTCAP), 0.0)
    # [1]-row state: the fold is the GEMM-fused kernels' (a scalar state rescaled once a block).
    m = tl.full((1,), EMPTY, dtype=tl.float32)
    s = tl.zeros((1,), dtype=tl.float32)
    a = tl.zeros((1,), dtype=tl.float32)
    q = tl.zeros((1,), dtype=tl.float32)
    u = tl.zeros((1,), dtype=tl.float32)
    for v0 in range(0, vocab_size, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        inside = offs < vocab_size
        z = transform(tl.load(base + offs, mask=inside, other=0.0), inv_temperature, softcap, HAS_SOFTCAP)[None, :]
        u += tl.sum(tl.where(inside[None, :], z, 0.0), axis=1)
        m, s, a, q = softmax_fold(z, inside[None, :], m, s, a, q, True, True)
    at = row + tl.arange(0, 1)
    plane = n_rows
    tl.store(out_ptr + at, m)
    tl.store(out_ptr + plane + at, s)
    tl.store(out_ptr + 2 * plane + at, a)
    tl.store(out_ptr + 3 * plane + at, q)
    tl.store(out_ptr + 4 * plane + row, t)
    tl.store(out_ptr + 5 * plane + at, u)


def launch_rows_stats(logits, targets, temperature, softcap):
    """Stats of every row of logits [n, V] (any float dtype, unit stride along V); targets [n] int."""
    import torch

    from ..tiles import Stats

    n, vocab = logits.shape
    out = torch.empty((6, n), device=logits.device, dtype=torch.float32)
    if n:
        args = (logits, targets, out, n, vocab, logits.stride(0), 1.0 / temperature, softcap or 1.0)
        block = forced_block()
        if interpreting() or block:
            rows_stats_kernel.fn[(n,)](*args, HAS_SOFTCAP=softcap is not None,
                                       BLOCK_V=block or row_block(vocab, 1024), num_warps=4)
        else:
            tuned(rows_stats_kernel)[(n,)](*args, HAS_SOFTCAP=softcap is not None)
    return Stats(*out.unbind(0))
