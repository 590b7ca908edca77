"""Budget strategy, backward: d loss / d logits of materialised fp32 logits, in the GEMMs' dtype.

For each row r of L [n, V], with z = softcap * tanh(L / temperature / softcap),
p_v = exp(z_v - lse_r) and upstream gradients g_logp, g_lse of log p(target) and lse:
    dL_v = [g_logp [v = target] + p_v (g_lse - g_logp)] * (1 - (z_v / softcap)^2) / temperature
(1 - tanh^2 formed as 4e / (1 + e)^2, e = exp(-2|u / softcap|): no cancellation where it saturates)
L is fp32 (a bf16 GEMM with an fp32 result: the logits are never rounded to bf16);
dL goes to `out` in the input dtype, as the operand of the caller's dh = dL W and
dW = dL^T h GEMMs (out may be L itself for fp32 inputs).

Stores: nothing. Recomputes: p from the stored logits and the row's lse.
Cost: ~10 n V elementwise FLOPs; reads n V fp32 logits and writes n V gradients (2 bytes each for bf16).
"""
import triton
import triton.language as tl

from .config import row_block
from .logits_tile import row_columns, transform_with_slope


@triton.jit
def rows_grad_kernel(logits_ptr, out_ptr, targets_ptr, lse_ptr, grad_logp_ptr, grad_lse_ptr, vocab_size, stride_row,
                     stride_out, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row, offs, inside = row_columns(vocab_size, BLOCK_V)
    ptrs = logits_ptr + row.to(tl.int64) * stride_row + offs
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    grad_logp = tl.load(grad_logp_ptr + row)
    grad_lse = tl.load(grad_lse_ptr + row)
    z, slope = transform_with_slope(tl.load(ptrs, mask=inside, other=0.0), inv_temperature, softcap, HAS_SOFTCAP)
    dz = (tl.exp(z - lse) * (grad_lse - grad_logp) + tl.where(offs == target, grad_logp, 0.0)) * slope
    out_ptrs = out_ptr + row.to(tl.int64) * stride_out + offs
    tl.store(out_ptrs, dz.to(out_ptr.dtype.element_ty), mask=inside)


def launch_rows_grad(logits, out, targets, lse, grad_logp, grad_lse, temperature, softcap):
    """Write the gradient of logits [n, V] into out [n, V] (may be logits), row r scaled by the
    upstream grad_logp[r], grad_lse[r]."""
    n, vocab = logits.shape
    if n:
        block = row_block(vocab, 2048)
        rows_grad_kernel[(n, triton.cdiv(vocab, block))](
            logits, out, targets, lse, grad_logp, grad_lse, vocab, logits.stride(0), out.stride(0), 1.0 / temperature,
            softcap or 1.0,
            HAS_SOFTCAP=softcap is not None, BLOCK_V=block, num_warps=4)
    return out
