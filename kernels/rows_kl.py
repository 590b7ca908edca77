"""Budget strategy of the per-token KL: statistics and gradient over two materialised logit rows.

The policy logits P [n, V] and the reference logits R [n, V] of one chunk sit in memory
(one GEMM each, fp32 results of half-precision operands). With z = f(P), y = f(R), f(x) = softcap * tanh(x / temperature / softcap),
and a = the side that weights the KL, b = the other (a = y, b = z for KL(p_ref || p_θ);
swapped for KL(p_θ || p_ref)):

rows_kl_stats_kernel, one program a row, one running state per lane merged at the end:
    m_a, s_a = Σ exp(z_a - m_a),  m_b, s_b = Σ exp(z_b - m_b),
    c = Σ exp(z_a - m_a) ((z_a - m_a) - (z_b - m_b)),  t_a = z_a[target],  t_b = z_b[target]
(when a block raises the maxima, c <- e^(m_a - m_a') (c + ((m_a - m_a') - (m_b - m_b')) s_a));
prefops.token_kl.finalize_kl turns them into KL(a || b) = c / s_a + log s_b - log s_a,
both lse and both log-probs of the target.

rows_kl_grad_kernel writes d loss / dP into `out` (the GEMMs' input dtype; P itself for fp32), loss = Σ_r g_kl KL_r + g_logp log p_θ(target_r):
    dz_v = g_kl (p_v - r_v)                        KL(p_ref || p_θ)  (POLICY_FIRST false)
         = g_kl p_v (log p_v - log r_v - KL)       KL(p_θ || p_ref)  (POLICY_FIRST true)
           + g_logp ([v = target] - p_v),  then * (1 - (z / softcap)^2) / temperature,
with p = exp(z - lse_θ), r = exp(y - lse_ref); out is the operand of the caller's
dh = dP W and dW = dP^T h GEMMs.

Stores: 7 floats a row from the stats pass (the caller keeps lse_θ, lse_ref, KL); nothing
else. Recomputes p and r from the stored logits in the gradient pass.
Cost: stats ~16 n V elementwise FLOPs, reads 2 n V fp32 elements; gradient ~14 n V FLOPs,
reads 2 n V fp32 elements and writes n V (2 bytes each in bf16): a few percent of the two
GEMMs that produced the rows.
"""
import triton
import triton.language as tl

from .config import forced_block, interpreting, row_block, row_configs, tuned
from .logits_tile import row_columns, transform, transform_with_slope
from .online_softmax import EMPTY, kl_fold


# The block and warps that keep enough loads in flight are the device's call (see rows_stats.py).
@triton.autotune(configs=row_configs(), key=["vocab_size", "HAS_SOFTCAP"])
@triton.jit
def rows_kl_stats_kernel(logits_a_ptr, logits_b_ptr, targets_ptr, out_ptr, n_rows, vocab_size, stride_a, stride_b,
                         inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base_a = logits_a_ptr + row.to(tl.int64) * stride_a
    base_b = logits_b_ptr + row.to(tl.int64) * stride_b
    target = tl.load(targets_ptr + row)
    # A target beyond the row (a later vocabulary slice's) contributes no logit here.
    in_row = (target >= 0) & (target < vocab_size)
    t_a = tl.where(in_row, transform(tl.load(base_a + target, mask=in_row, other=0.0), inv_temperature, softcap,
                                     HAS_SOFTCAP), 0.0)
    t_b = tl.where(in_row, transform(tl.load(base_b + target, mask=in_row, other=0.0), inv_temperature, softcap,
                                     HAS_SOFTCAP), 0.0)
    # [1]-row state: the fold is the GEMM-fused kernels' (rows_stats.py says why not per lane).
    m_a = tl.full((1,), EMPTY, dtype=tl.float32)
    m_b = tl.full((1,), EMPTY, dtype=tl.float32)
    s_a = tl.zeros((1,), dtype=tl.float32)
    s_b = tl.zeros((1,), dtype=tl.float32)
    c = tl.zeros((1,), dtype=tl.float32)
    for v0 in range(0, vocab_size, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        inside = offs < vocab_size
        za = transform(tl.load(base_a + offs, mask=inside, other=0.0), inv_temperature, softcap, HAS_SOFTCAP)
        zb = transform(tl.load(base_b + offs, mask=inside, other=0.0), inv_temperature, softcap, HAS_SOFTCAP)
        m_a, m_b, s_a, s_b, c = kl_fold(za[None, :], zb[None, :], inside[None, :], m_a, m_b, s_a, s_b, c)
    at = row + tl.arange(0, 1)
    plane = n_rows
    tl.store(out_ptr + at, m_a)
    tl.store(out_ptr + plane + at, s_a)
    tl.store(out_ptr + 2 * plane + at, m_b)
    tl.store(out_ptr + 3 * plane + at, s_b)
    tl.store(out_ptr + 4 * plane + at, c)
    tl.store(out_ptr + 5 * plane + row, t_a)
    tl.store(out_ptr + 6 * plane + row, t_b)


@triton.jit
def rows_kl_grad_kernel(logits_ptr, ref_logits_ptr, out_ptr, targets_ptr, lse_ptr, ref_lse_ptr, kl_ptr, grad_kl_ptr,
                        grad_logp_ptr, vocab_size, stride_row, stride_ref, stride_out, inv_temperature, softcap,
                        HAS_SOFTCAP: tl.constexpr, POLICY_FIRST: tl.constexpr, BLOCK_V: tl.constexpr):
    row, offs, inside = row_columns(vocab_size, BLOCK_V)
    ptrs = logits_ptr + row.to(tl.int64) * stride_row + offs
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    ref_lse = tl.load(ref_lse_ptr + row)
    grad_kl = tl.load(grad_kl_ptr + row)
    grad_logp = tl.load(grad_logp_ptr + row)
    z, slope = transform_with_slope(tl.load(ptrs, mask=inside, other=0.0), inv_temperature, softcap, HAS_SOFTCAP)
    y = transform(tl.load(ref_logits_ptr + row.to(tl.int64) * stride_ref + offs, mask=inside, other=0.0),
                  inv_temperature, softcap, HAS_SOFTCAP)
    log_p = z - lse
    log_r = y - ref_lse
    p = tl.exp(log_p)
    if POLICY_FIRST:
        dkl = p * (log_p - log_r - tl.load(kl_ptr + row))
    else:
        dkl = p - tl.exp(log_r)
    dz = (grad_kl * dkl - grad_logp * p + tl.where(offs == target, grad_logp, 0.0)) * slope
    tl.store(out_ptr + row.to(tl.int64) * stride_out + offs, dz.to(out_ptr.dtype.element_ty), mask=inside)


def launch_rows_kl_stats(logits, ref_logits, targets, policy_first, temperature, softcap):
    """KLStats of every row of the policy and reference logits [n, V] (unit stride along V);
    targets [n] int (-1: none). Side a is the policy when policy_first."""
    import torch

    from ..token_kl import KLStats

    n, vocab = logits.shape
    first, second = (logits, ref_logits) if policy_first else (ref_logits, logits)
    out = torch.empty((7, n), device=logits.device, dtype=torch.float32)
    if n:
        args = (first, second, targets, out, n, vocab, first.stride(0), second.stride(0), 1.0 / temperature,
                softcap or 1.0)
        block = forced_block()
        if interpreting() or block:
            rows_kl_stats_kernel.fn[(n,)](*args, HAS_SOFTCAP=softcap is not None,
                                          BLOCK_V=block or row_block(vocab, 1024), num_warps=4)
        else:
            tuned(rows_kl_stats_kernel)[(n,)](*args, HAS_SOFTCAP=softcap is not None)
    return KLStats(*out.unbind(0))


def launch_rows_kl_grad(logits, ref_logits, out, targets, lse, ref_lse, kl, grad_kl, grad_logp, policy_first,
                        temperature, softcap):
    """Write d loss / d logits of the policy logits [n, V] into out [n, V] (may be logits), row r
    scaled by grad_kl[r] and grad_logp[r]."""
    n, vocab = logits.shape
    if n:
        block = row_block(vocab, 2048)
        rows_kl_grad_kernel[(n, triton.cdiv(vocab, block))](
            logits, ref_logits, out, targets, lse, ref_lse, kl, grad_kl, grad_logp, vocab, logits.stride(0),
            ref_logits.stride(0), out.stride(0), 1.0 / temperature, softcap or 1.0, HAS_SOFTCAP=softcap is not None,
            POLICY_FIRST=policy_first, BLOCK_V=block, num_warps=4)
    return out
