"""The online-softmax fold every statistics kernel shares: a [R, B] tile of logits folded into
each row's running state, so that the state after the last tile is that of the whole row.

For one row with running max m and the tile's entries z_v inside the vocabulary:
    m' = max(m, max_v z_v),  r = exp(m - m'),
    s' = r s + sum_v exp(z_v - m')                          (s = sum exp(z - m))
    a' = r (a + (m - m') s) + sum_v exp(z_v - m')(z_v - m')   (a = sum exp(z - m)(z - m))
    q' = r^2 q + sum_v exp(2 (z_v - m'))                     (q = sum exp(2 (z - m)))
and, for two distributions z (weighting) and y over the same vocabulary,
    c' = r_z (c + ((m_z - m_z') - (m_y - m_y')) s_z) + sum_v exp(z_v - m_z')((z_v - m_z') - (y_v - m_y'))
(c = sum exp(z - m_z)((z - m_z) - (y - m_y)), so that KL(z || y) = c / s_z + log s_y - log s_z,
prefops/token_kl.py). One exp an entry and side, plus one a row; the running max keeps every
exp <= 1. The GEMM-fused kernels (logits_stats, token_kl_stats) fold [BLOCK_N, BLOCK_V] tiles;
the row kernels (rows_stats, rows_kl) fold [1, BLOCK_V] slices of one materialised row.

Cost: ~8 FLOPs and one exp an entry; reads and writes nothing (registers only).
"""
import triton
import triton.language as tl

EMPTY = tl.constexpr(-1.0e38)


@triton.jit
def softmax_fold(z, mask, m, s, a, q, ENTROPY: tl.constexpr, SUM_P2: tl.constexpr):
    """(m, s, a, q) [R] after folding z [R, B] (mask: entries inside the vocabulary); a and q only
    when ENTROPY, SUM_P2 (else returned as given)."""
    z = tl.where(mask, z, EMPTY)
    m_new = tl.maximum(m, tl.max(z, axis=1))
    rescale = tl.exp(m - m_new)
    shifted = z - m_new[:, None]
    e = tl.where(mask, tl.exp(shifted), 0.0)
    if ENTROPY:
        a = rescale * (a + (m - m_new) * s) + tl.sum(e * shifted, axis=1)
    s = rescale * s + tl.sum(e, axis=1)
    if SUM_P2:
        q = rescale * rescale * q + tl.sum(e * e, axis=1)
    return m_new, s, a, q


@triton.jit
def kl_fold(za, zb, mask, m_a, m_b, s_a, s_b, c):
    """(m_a, m_b, s_a, s_b, c) [R] after folding the tiles za (the weighting side) and zb [R, B]."""
    za = tl.where(mask, za, EMPTY)
    zb = tl.where(mask, zb, EMPTY)
    ma_new = tl.maximum(m_a, tl.max(za, axis=1))
    mb_new = tl.maximum(m_b, tl.max(zb, axis=1))
    scale_a = tl.exp(m_a - ma_new)
    shift_a = za - ma_new[:, None]
    shift_b = zb - mb_new[:, None]
    ea = tl.where(mask, tl.exp(shift_a), 0.0)
    eb = tl.where(mask, tl.exp(shift_b), 0.0)
    c = scale_a * (c + ((m_a - ma_new) - (m_b - mb_new)) * s_a) + tl.sum(ea * (shift_a - shift_b), axis=1)
    s_a = scale_a * s_a + tl.sum(ea, axis=1)
    s_b = tl.exp(m_b - mb_new) * s_b + tl.sum(eb, axis=1)
    return ma_new, mb_new, s_a, s_b, c
