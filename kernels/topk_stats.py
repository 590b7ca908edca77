"""Streamed exact top-k of the logits: a running top-k per row, merged with each vocabulary block.

Used inside the forward statistics kernel (logits_stats.py, TOP_K > 0), so the
top-k comes from the same logits tile as lse and entropy, in the same pass.

Per row the running set holds K (value, vocabulary id) slots, padded to a power
of two KP with slots that can never be evicted. For a tile z [BLOCK_N, BLOCK_V]:
    tau    = min of the running slots (the current k-th largest, or EMPTY)
    rounds = min(K, max over rows of #{v : z_v > tau})
and each round moves the largest remaining tile value of every row into the
slot holding that row's minimum, if it beats it. A value that enters the final
top-k of a row beats tau when its tile is merged, and at most K such values
enter per tile, so `rounds` rounds are exact. Tiles with nothing above tau
cost one compare-and-count; once the running set holds the row's large logits
(after the first few blocks) most tiles need zero or one round.

Exact: values are compared, never rounded; ties keep a multiset (the same
values as torch.topk, any of the tied ids). tl.sort/tl.topk are not used: a
bitonic sort of the whole tile costs log^2(BLOCK_V) passes where a gated
extraction mostly costs none.

Stores: nothing for backward (forward-only diagnostics). The caller writes K
values and ids per row and split; the host merges the splits (n x splits x K).
Cost per tile: ~3 BLOCK_N BLOCK_V compares for the gate, plus ~6 BLOCK_N
BLOCK_V per round; no extra memory traffic, no extra GEMM.
"""
import triton
import triton.language as tl

from .online_softmax import EMPTY

# Padding slots (index >= K) hold NEVER so they are never the minimum, hence never evicted.
# Globals read inside @triton.jit must be tl.constexpr (the GPU compiler rejects plain floats).
NEVER = tl.constexpr(3.0e38)
NO_ID = tl.constexpr(2147483647)


@triton.jit
def topk_init(BLOCK_N: tl.constexpr, TOP_K: tl.constexpr, TOP_KP: tl.constexpr):
    slots = tl.arange(0, TOP_KP)
    top = tl.where(slots[None, :] < TOP_K, EMPTY, NEVER) + tl.zeros((BLOCK_N, TOP_KP), dtype=tl.float32)
    ids = tl.full((BLOCK_N, TOP_KP), -1, dtype=tl.int32)
    return top, ids


@triton.jit
def topk_update(top, ids, z, offs_v, valid, TOP_K: tl.constexpr, TOP_KP: tl.constexpr):
    """Merge the tile z [BLOCK_N, BLOCK_V] (vocabulary ids offs_v, `valid` mask) into the running top-k."""
    slots = tl.arange(0, TOP_KP)
    candidates = tl.where(valid, z, EMPTY)
    tau = tl.min(top, axis=1)
    above = tl.sum((candidates > tau[:, None]).to(tl.int32), axis=1)
    rounds = tl.minimum(tl.max(above, axis=0), TOP_K)
    for _ in range(0, rounds):
        best = tl.max(candidates, axis=1)
        best_id = tl.min(tl.where(candidates == best[:, None], offs_v[None, :], NO_ID), axis=1)
        tau = tl.min(top, axis=1)
        slot = tl.min(tl.where(top == tau[:, None], slots[None, :], TOP_KP), axis=1)
        replace = (best > tau)[:, None] & (slots[None, :] == slot[:, None])
        top = tl.where(replace, best[:, None], top)
        ids = tl.where(replace, best_id[:, None], ids)
        candidates = tl.where(offs_v[None, :] == best_id[:, None], EMPTY, candidates)
    return top, ids
