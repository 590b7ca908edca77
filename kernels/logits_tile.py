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
def tanh(x):
    # exp form: saturates cleanly to +-1 for large |x| and runs under the interpreter.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def row_columns(vocab_size, BLOCK_V: tl.constexpr):
    """A row-kernel program's place in a materialised [n, V] tensor: (row, columns, columns inside V)."""
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    return tl.program_id(0), offs, offs < vocab_size


@triton.jit
def transform(linear, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr):
    """z = softcap * tanh(u / softcap) with u = linear / temperature, in fp32."""
    z = linear.to(tl.float32) * inv_temperature
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z


@triton.jit
def linear_grad(dz, z, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr):
    """d loss / d(h W^T + b) from d loss / dz: the softcap and temperature chain rule, dz/du = 1 - (z/softcap)^2."""
    if HAS_SOFTCAP:
        capped = z / softcap
        dz = dz * (1.0 - capped * capped)
    return dz * inv_temperature


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
def logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, v_mask, hidden_size, stride_h, stride_w,
                inv_temperature, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
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
    return transform(acc, inv_temperature, softcap, HAS_SOFTCAP)
