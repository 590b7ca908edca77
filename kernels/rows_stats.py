"""Budget strategy, forward: online-softmax statistics of logits that already sit in memory.

For each row r of a materialised logits chunk L [n, V] (the output of one GEMM),
with z = softcap * tanh(L / temperature / softcap):
    m = max z,  s = sum exp(z - m),  a = sum exp(z - m)(z - m),
    q = sum exp(2(z - m)),  t = z[target_r],  u = sum z
(prefops/tiles.py turns them into log p, lse, entropy, sum p^2, the mean logit
u / V and top-1 = (t >= m)). u is a plain sum, never rescaled.

Stores: 6 floats a row; nothing else. The gradient kernel (rows_grad.py) reads
the logits again and overwrites them with d loss / dL in place.

Cost: ~9 n V elementwise FLOPs; reads n V elements once (2 bytes each in bf16),
writes 24 n bytes. At V = 128256 in bf16 that is 256 KB a row, a few percent of
the time of the GEMM that produced it.
"""
import triton
import triton.language as tl

from .config import row_block
from .logits_tile import transform

EMPTY = tl.constexpr(-1.0e38)


@triton.jit
def rows_stats_kernel(logits_ptr, targets_ptr, out_ptr, n_rows, vocab_size, stride_row, inv_temperature, softcap,
                      HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    target = tl.load(targets_ptr + row)
    base = logits_ptr + row.to(tl.int64) * stride_row
    m = tl.full((BLOCK_V,), EMPTY, dtype=tl.float32)
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    a = tl.zeros((BLOCK_V,), dtype=tl.float32)
    q = tl.zeros((BLOCK_V,), dtype=tl.float32)
    t = tl.zeros((BLOCK_V,), dtype=tl.float32)
    u = tl.zeros((BLOCK_V,), dtype=tl.float32)
    # One running state per lane, merged at the end: no cross-lane reduction inside the loop.
    for v0 in range(0, vocab_size, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        inside = offs < vocab_size
        z = transform(tl.load(base + offs, mask=inside, other=0.0), inv_temperature, softcap, HAS_SOFTCAP)
        u += tl.where(inside, z, 0.0)
        z = tl.where(inside, z, EMPTY)
        m_new = tl.maximum(m, z)
        rescale = tl.exp(m - m_new)
        shifted = z - m_new
        e = tl.where(inside, tl.exp(shifted), 0.0)
        a = rescale * (a + (m - m_new) * s) + e * shifted
        s = rescale * s + e
        q = rescale * rescale * q + e * e
        # A target beyond the row (a later vocabulary slice's) may equal a masked lane's offset.
        t += tl.where((offs == target) & inside, z, 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    delta = m - m_row
    c = tl.exp(delta)
    plane = n_rows
    tl.store(out_ptr + row, m_row)
    tl.store(out_ptr + plane + row, tl.sum(s * c, axis=0))
    tl.store(out_ptr + 2 * plane + row, tl.sum(c * (a + delta * s), axis=0))
    tl.store(out_ptr + 3 * plane + row, tl.sum(q * c * c, axis=0))
    tl.store(out_ptr + 4 * plane + row, tl.sum(t, axis=0))
    tl.store(out_ptr + 5 * plane + row, tl.sum(u, axis=0))


def launch_rows_stats(logits, targets, temperature, softcap):
    """Stats of every row of logits [n, V] (any float dtype, unit stride along V); targets [n] int."""
    import torch

    from ..tiles import Stats

    n, vocab = logits.shape
    out = torch.empty((6, n), device=logits.device, dtype=torch.float32)
    if n:
        rows_stats_kernel[(n,)](logits, targets, out, n, vocab, logits.stride(0), 1.0 / temperature, softcap or 1.0,
                                HAS_SOFTCAP=softcap is not None, BLOCK_V=row_block(vocab, 4096), num_warps=8)
    return Stats(*out.unbind(0))
