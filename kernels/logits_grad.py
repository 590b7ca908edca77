"""Backward: gradient of the loss with respect to the linear output, for one tile of rows x vocabulary.

Recomputes z for the tile (same code as forward) and writes
    d(hW^T + b) = [g_logp [v = target] + p_v (g_lse - g_logp - g_ent (log p_v + H))]
                  * (1 - (z / softcap)^2) / temperature
with p_v = exp(z - lse), from the saved lse and entropy (8 bytes a row).
The caller turns the stored tile into dh and dW with two tensor-core GEMMs.

Cost per call on a [n, v] tile: 2 n v H FLOPs (recompute) + ~10 n v elementwise;
reads h rows and the W block, writes n * v elements in the input dtype.
"""
import triton
import triton.language as tl

from .config import grad_configs, interpreting, tuned
from .logits_tile import counted_row_block, linear_tile, transform_with_slope, vocab_block


@triton.autotune(configs=grad_configs(), key=["hidden_size", "IEEE", "HAS_ENTROPY"])
@triton.jit
def logits_grad_kernel(h_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, lse_ptr, entropy_ptr,
                       grad_logp_ptr, grad_lse_ptr, grad_entropy_ptr, out_ptr,
                       n_rows, v_begin, v_count, hidden_size, stride_h, stride_w, stride_out,
                       inv_temperature, softcap,
                       HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr,
                       IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n, row_mask, rows, targets = counted_row_block(rows_ptr, targets_ptr, n_rows, BLOCK_N)
    local_v, v_mask, offs_v = vocab_block(v_begin, v_count, BLOCK_V)
    lse = tl.load(lse_ptr + offs_n, mask=row_mask, other=0.0)
    grad_logp = tl.load(grad_logp_ptr + offs_n, mask=row_mask, other=0.0)
    grad_lse = tl.load(grad_lse_ptr + offs_n, mask=row_mask, other=0.0)

    linear = linear_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, hidden_size, stride_h, stride_w,
                         HAS_BIAS, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
    z, slope = transform_with_slope(linear, inv_temperature, softcap, HAS_SOFTCAP)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    coef = (grad_lse - grad_logp)[:, None]
    if HAS_ENTROPY:
        entropy = tl.load(entropy_ptr + offs_n, mask=row_mask, other=0.0)
        grad_entropy = tl.load(grad_entropy_ptr + offs_n, mask=row_mask, other=0.0)
        coef = coef - grad_entropy[:, None] * (log_p + entropy[:, None])
    dz = p * coef + tl.where(offs_v[None, :] == targets[:, None], grad_logp[:, None], 0.0)
    dz = dz * slope
    # int64: a tile of many rows can span more than 2^31 elements (the sweep at L hit it on an H200).
    out = out_ptr + offs_n.to(tl.int64)[:, None] * stride_out + local_v[None, :]
    tl.store(out, dz.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & v_mask[None, :])


def launch_logits_grad(hidden, weight, bias, rows, targets, lse, entropy, grad_logp, grad_lse, grad_entropy,
                       temperature, softcap, v_begin, out):
    """Fill out [n, v] with d loss / d(hW^T + b) for the given rows and vocabulary range [v_begin, v_begin + v)."""
    import torch

    n, v_count = out.shape
    has_entropy = grad_entropy is not None
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(v_count, meta["BLOCK_V"]))  # noqa: E731
    tuned(logits_grad_kernel)[grid](
        hidden, weight, bias if bias is not None else weight, rows, targets, lse,
        entropy if has_entropy else lse, grad_logp, grad_lse, grad_entropy if has_entropy else grad_lse, out,
        n, v_begin, v_count, weight.shape[1], hidden.stride(0), weight.stride(0), out.stride(0),
        1.0 / temperature, softcap or 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_ENTROPY=has_entropy,
        IEEE=hidden.dtype == torch.float32 or interpreting(), UPCAST=interpreting(),
    )
    return out
