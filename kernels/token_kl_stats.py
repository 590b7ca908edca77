"""Forward: online statistics of the KL between two next-token distributions, both logits streamed.

For each counted row r and vocabulary split, over vocabulary blocks, the kernel builds the
logit tile of side a (the distribution that weights the KL) and of side b with the shared
logits_tile code, and keeps
    m_a, s_a = Σ exp(z_a - m_a),  m_b, s_b = Σ exp(z_b - m_b),
    c = Σ exp(z_a - m_a) ((z_a - m_a) - (z_b - m_b)),  t_a = z_a[target],  t_b = z_b[target].
When a block raises the maxima, c <- e^(m_a - m_a') (c + ((m_a - m_a') - (m_b - m_b')) s_a):
the old terms are re-expressed against the new shifts. Then
    KL(a || b) = c / s_a + log s_b - log s_a,  lse_a = m_a + log s_a,  lse_b = m_b + log s_b
(prefops/token_kl.py merges the splits and finishes).

Stores for backward: nothing here; the caller keeps lse of both sides and KL per row
(12 bytes a token). Backward recomputes both tiles.

Cost: 2 N V (H_a + H_b) FLOPs (two GEMMs over the counted rows only) and ~12 N V
elementwise; reads each side's h once per split and its W once per row block;
writes 7 N splits floats.
"""
import triton
import triton.language as tl

from .config import interpreting, pair_configs, tuned, vocabulary_splits
from .logits_tile import counted_row_block, logits_tile
from .online_softmax import EMPTY, kl_fold


@triton.autotune(configs=pair_configs(), key=["hidden_a", "hidden_b", "vocab_size", "IEEE"])
@triton.jit
def token_kl_stats_kernel(ha_ptr, wa_ptr, ba_ptr, hb_ptr, wb_ptr, bb_ptr, rows_ptr, targets_ptr, out_ptr,
                          n_rows, vocab_size, hidden_a, hidden_b, stride_ha, stride_wa, stride_hb, stride_wb,
                          v_per_split, splits, inv_temperature, softcap,
                          HAS_BIAS_A: tl.constexpr, HAS_BIAS_B: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                          IEEE: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_s = tl.program_id(1)
    offs_n, row_mask, rows, targets = counted_row_block(rows_ptr, targets_ptr, n_rows, BLOCK_N)

    m_a = tl.full((BLOCK_N,), EMPTY, dtype=tl.float32)
    m_b = tl.full((BLOCK_N,), EMPTY, dtype=tl.float32)
    s_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    c = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, vocab_size)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        za = logits_tile(ha_ptr, wa_ptr, ba_ptr, rows, row_mask, offs_v, v_mask, hidden_a, stride_ha, stride_wa,
                         inv_temperature, softcap, HAS_BIAS_A, HAS_SOFTCAP, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        zb = logits_tile(hb_ptr, wb_ptr, bb_ptr, rows, row_mask, offs_v, v_mask, hidden_b, stride_hb, stride_wb,
                         inv_temperature, softcap, HAS_BIAS_B, HAS_SOFTCAP, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        m_a, m_b, s_a, s_b, c = kl_fold(za, zb, v_mask[None, :], m_a, m_b, s_a, s_b, c)
        hit = offs_v[None, :] == targets[:, None]
        t_a += tl.sum(tl.where(hit, za, 0.0), axis=1)
        t_b += tl.sum(tl.where(hit, zb, 0.0), axis=1)

    out = out_ptr + offs_n * splits + pid_s
    plane = n_rows * splits
    tl.store(out, m_a, mask=row_mask)
    tl.store(out + plane, s_a, mask=row_mask)
    tl.store(out + 2 * plane, m_b, mask=row_mask)
    tl.store(out + 3 * plane, s_b, mask=row_mask)
    tl.store(out + 4 * plane, c, mask=row_mask)
    tl.store(out + 5 * plane, t_a, mask=row_mask)
    tl.store(out + 6 * plane, t_b, mask=row_mask)


def launch_token_kl_stats(hidden_a, weight_a, bias_a, hidden_b, weight_b, bias_b, rows, targets, temperature,
                          softcap):
    """Partial KLStats [n, splits] of the counted rows (targets: int32, -1 for none)."""
    import torch

    from ..token_kl import KLStats

    n = rows.numel()
    vocab = weight_a.shape[0]
    splits, v_per_split = vocabulary_splits(n, vocab, hidden_a.device)
    out = torch.empty((7, n, splits), device=hidden_a.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
    tuned(token_kl_stats_kernel)[grid](
        hidden_a, weight_a, bias_a if bias_a is not None else weight_a,
        hidden_b, weight_b, bias_b if bias_b is not None else weight_b, rows, targets, out,
        n, vocab, weight_a.shape[1], weight_b.shape[1], hidden_a.stride(0), weight_a.stride(0),
        hidden_b.stride(0), weight_b.stride(0), v_per_split, splits, 1.0 / temperature, softcap or 1.0,
        HAS_BIAS_A=bias_a is not None, HAS_BIAS_B=bias_b is not None, HAS_SOFTCAP=softcap is not None,
        IEEE=hidden_a.dtype == torch.float32 or interpreting(), UPCAST=interpreting(),
    )
    return KLStats(*out.unbind(0))
