"""One tile of logits, z = softcap * tanh((h W^T + b) / temperature / softcap), in registers.

Shared by the forward statistics kernel and the backward gradient kernel so the
two recompute bit-identical logits. Rows of h are gathered through an index
vector, so ignored tokens (prompt, padding) are never loaded or multiplied.

Cost per [BLOCK_N, BLOCK_V] tile: 2 * BLOCK_N * BLOCK_V * H FLOPs on the tensor
cores; reads (BLOCK_N + BLOCK_V) * H elements (most hit L2 when neighbouring
programs share a vocabulary block); writes nothing.
"""
import triton
import triton.language as tl


@triton.jit
def tanh_parts(x):
    """(tanh(x), e = exp(-2|x|)). The exp of -2|x| lies in (0, 1]: it saturates cleanly to +-1
    without overflow, runs under the interpreter, and gives the slope 1 - tanh^2 = 4e / (1 + e)^2
    without the cancellation of 1 - t^2 where the tanh saturates."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t), e


@triton.jit
def row_columns(vocab_size, BLOCK_V: tl.constexpr):
    """A row-kernel program's place in a materialised [n, V] tensor: (row, columns, columns inside V)."""
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    return tl.program_id(0), offs, offs < vocab_size


@triton.jit
def transform_with_slope(linear, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr):
    """(z, dz / dlinear) with z = softcap * tanh(u / softcap), u = linear / temperature, in fp32:
    the logits and the chain-rule factor of the gradient kernels."""
    z = linear.to(tl.float32) * inv_temperature
    slope = tl.full(z.shape, 1.0, tl.float32) * inv_temperature
    if HAS_SOFTCAP:
        t, e = tanh_parts(z / softcap)
        z = softcap * t
        slope = slope * (4.0 * e / ((1.0 + e) * (1.0 + e)))
    return z, slope


@triton.jit
def transform(linear, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr):
    """z of transform_with_slope, bit for bit (the slope is compiled away)."""
    z, _ = transform_with_slope(linear, inv_temperature, softcap, HAS_SOFTCAP)
    return z


@triton.jit
def counted_row_block(rows_ptr, targets_ptr, n_rows, BLOCK_N: tl.constexpr):
    """This program's block of counted rows: (offsets, mask, row indices into h, targets; -1 past the end)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < n_rows
    rows = tl.load(rows_ptr + offs_n, mask=row_mask, other=0)
    targets = tl.load(targets_ptr + offs_n, mask=row_mask, other=-1)
    return offs_n, row_mask, rows, targets


@triton.jit
def vocab_block(v_begin, v_count, BLOCK_V: tl.constexpr):
    """This program's columns of a gradient tile over [v_begin, v_begin + v_count): (local, mask, global)."""
    local_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    return local_v, local_v < v_count, v_begin + local_v


@triton.jit
def linear_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, hidden_size, stride_h, stride_w,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """h W^T + b of the tile, fp32 (before the temperature and softcap)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hidden_size
        h = tl.load(h_ptr + rows[:, None] * stride_h + offs_k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[:, None] * stride_w + offs_k[None, :],
                    mask=v_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            # The CPU interpreter multiplies half-precision dots wrongly; fp32 operands
            # give the same products as the tensor cores (exact, fp32 accumulation).
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, hidden_size, stride_h, stride_w,
                inv_temperature, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    linear = linear_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, hidden_size, stride_h, stride_w,
                         HAS_BIAS, IEEE, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
    return transform(linear, inv_temperature, softcap, HAS_SOFTCAP)
