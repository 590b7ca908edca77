"""Backward of the per-token KL (and log p(target)): gradient with respect to the policy's linear output.

For one tile of rows x vocabulary, recomputes the policy logits z and the reference
logits y with the shared logits_tile code (bit-identical to forward) and writes
    dz_v = g_kl (p_v - r_v)                        KL(p_ref || p_θ)  (POLICY_FIRST false)
         = g_kl p_v (log p_v - log r_v - KL)       KL(p_θ || p_ref)  (POLICY_FIRST true)
           + g_logp ([v = target] - p_v)
    then * (1 - (z / softcap)^2) / temperature,
with p = exp(z - lse_θ), r = exp(y - lse_ref) from the saved per-row lse of both sides
and KL (12 bytes a row). The reference gets no gradient. The caller turns the stored
tile into dh and dW with two tensor-core GEMMs (prefops.fused.linear_grads).

Cost per [n, v] tile: 2 n v (H + H_ref) FLOPs (both recomputes) + ~12 n v elementwise;
reads both sides' h rows and W blocks, writes n v elements in the policy dtype.
"""
import triton
import triton.language as tl

from .config import interpreting, pair_configs, tuned
from .logits_tile import counted_row_block, linear_tile, logits_tile, transform_with_slope, vocab_block


@triton.autotune(configs=pair_configs(), key=["hidden_size", "ref_hidden_size", "IEEE", "POLICY_FIRST"])
@triton.jit
def token_kl_grad_kernel(h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, rows_ptr, targets_ptr, lse_ptr, ref_lse_ptr,
                         kl_ptr, grad_kl_ptr, grad_logp_ptr, out_ptr,
                         n_rows, v_begin, v_count, hidden_size, ref_hidden_size, stride_h, stride_w, stride_rh,
                         stride_rw, stride_out, inv_temperature, softcap,
                         HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         POLICY_FIRST: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n, row_mask, rows, targets = counted_row_block(rows_ptr, targets_ptr, n_rows, BLOCK_N)
    local_v, v_mask, offs_v = vocab_block(v_begin, v_count, BLOCK_V)
    lse = tl.load(lse_ptr + offs_n, mask=row_mask, other=0.0)
    ref_lse = tl.load(ref_lse_ptr + offs_n, mask=row_mask, other=0.0)
    grad_kl = tl.load(grad_kl_ptr + offs_n, mask=row_mask, other=0.0)
    grad_logp = tl.load(grad_logp_ptr + offs_n, mask=row_mask, other=0.0)

    linear = linear_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, hidden_size, stride_h, stride_w,
                         HAS_BIAS, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
    z, slope = transform_with_slope(linear, inv_temperature, softcap, HAS_SOFTCAP)
    y = logits_tile(rh_ptr, rw_ptr, rb_ptr, rows, row_mask, offs_v, v_mask, ref_hidden_size, stride_rh, stride_rw,
                    inv_temperature, softcap, HAS_REF_BIAS, HAS_SOFTCAP, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
    log_p = z - lse[:, None]
    log_r = y - ref_lse[:, None]
    p = tl.exp(log_p)
    if POLICY_FIRST:
        kl = tl.load(kl_ptr + offs_n, mask=row_mask, other=0.0)
        dkl = p * (log_p - log_r - kl[:, None])
    else:
        dkl = p - tl.exp(log_r)
    dz = grad_kl[:, None] * dkl - grad_logp[:, None] * p
    dz += tl.where(offs_v[None, :] == targets[:, None], grad_logp[:, None], 0.0)
    dz = dz * slope
    # int64: a tile of many rows can span more than 2^31 elements (the sweep at L hit it on an H200).
    out = out_ptr + offs_n.to(tl.int64)[:, None] * stride_out + local_v[None, :]
    tl.store(out, dz.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & v_mask[None, :])


def launch_token_kl_grad(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows, targets, lse, ref_lse, kl,
                         grad_kl, grad_logp, policy_first, temperature, softcap, v_begin, out):
    """Fill out [n, v] with d loss / d(h W^T + b) for the given rows and vocabulary range [v_begin, v_begin + v)."""
    import torch

    n, v_count = out.shape
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(v_count, meta["BLOCK_V"]))  # noqa: E731
    tuned(token_kl_grad_kernel)[grid](
        hidden, weight, bias if bias is not None else weight, ref_hidden, ref_weight,
        ref_bias if ref_bias is not None else ref_weight, rows, targets, lse, ref_lse, kl, grad_kl, grad_logp, out,
        n, v_begin, v_count, weight.shape[1], ref_weight.shape[1], hidden.stride(0), weight.stride(0),
        ref_hidden.stride(0), ref_weight.stride(0), out.stride(0), 1.0 / temperature, softcap or 1.0,
        HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None, HAS_SOFTCAP=softcap is not None,
        POLICY_FIRST=policy_first, IEEE=hidden.dtype == torch.float32 or interpreting(), UPCAST=interpreting(),
    )
    return out
