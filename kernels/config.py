"""Launch configurations. Under TRITON_INTERPRET=1 (CPU) a single small config
keeps CI fast; on a GPU the autotuner picks among tensor-core friendly tiles.

`forced` lets tests reach, at small shapes, the code that only large vocabularies
run on a GPU: several vocabulary splits of the statistics kernels, split widths
that are no multiple of a block, several vocabulary blocks in the row kernels."""
import contextlib
import os
from typing import NamedTuple, Optional

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


AUTOTUNE_MODES = ("full", "quick")


def autotune_mode() -> str:
    """PREFOPS_AUTOTUNE, read when the kernels are defined: "quick" keeps the first two configs of
    each list, so the first tune of a shape compiles two per kernel (a short GPU lease, where
    benchmarks/first_light.sh must tune three shapes in minutes); "full" (the default) keeps all."""
    mode = os.environ.get("PREFOPS_AUTOTUNE") or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"PREFOPS_AUTOTUNE must be one of {', '.join(AUTOTUNE_MODES)}; got {mode!r}")
    return mode


def _configs(shapes):
    if interpreting():
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16}, num_warps=1)]
    if autotune_mode() == "quick":
        shapes = shapes[:2]
    return [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_K": k}, num_warps=w, num_stages=st)
            for n, v, k, w, st in shapes]


# Pruned with the sm_90 compile report (python tests/compile_for_hopper.py --profile): every
# config runs its GEMM on wgmma with 16-byte async copies, and those that spilled hundreds
# of bytes of registers to the stack (a 128 x 256 or a 128 x 128 tile at 4 warps in the
# statistics kernel, where the online-softmax epilogue shares registers with the
# accumulator) are gone. Which of the rest is fastest is the autotuner's call on the GPU. These two lists start
# with the fastest at shapes Q and L in the H200 kernel sweep (benchmarks/results/2026-12-04-h200-run3):
# deterministic mode launches the first one untimed (`tuned`), and quick autotuning keeps the first two.
def stats_configs():
    return _configs([(64, 256, 64, 8, 4), (128, 128, 64, 8, 3), (64, 128, 64, 8, 4), (128, 64, 64, 8, 4)])


def grad_configs():
    return _configs([(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)])


def pair_configs():
    # Two fp32 logit tiles (policy and reference) are live at once, so the tiles are
    # half the core kernels' (no spills at 8 warps; 8192-element tiles at 4 warps and
    # 128 x 128 at 8 spilled ~380 bytes in the statistics kernel).
    return _configs([(64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 4), (64, 128, 64, 8, 4)])


def tuned(kernel):
    """An autotuned kernel to launch as kernel[grid](...): itself, or in deterministic mode
    (prefops.determinism) its first configuration, untimed, so that every process runs the same tiles."""
    from ..determinism import enabled

    if not enabled():
        return kernel
    fixed = kernel.configs[0].all_kwargs()
    return _Fixed(kernel.fn, fixed)


class _Fixed(NamedTuple):
    fn: object
    options: dict

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.fn[grid](*args, **kwargs, **self.options)


class Forced(NamedTuple):
    splits: Optional[int] = None
    v_per_split: Optional[int] = None
    block: Optional[int] = None


# None outside `forced`: the launchers then pay one comparison for the hook.
_forced: Optional[Forced] = None


@contextlib.contextmanager
def forced(*, splits=None, v_per_split=None, block=None):
    """Force the launch geometry inside the block (tests): `splits` vocabulary splits or
    splits `v_per_split` columns wide (any width: a split's last block is masked) in
    the statistics kernels, and a vocabulary block of `block` columns (a power of two)
    in the row kernels. Unset values keep the normal choice."""
    global _forced
    for name, value in (("splits", splits), ("v_per_split", v_per_split), ("block", block)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if splits is not None and v_per_split is not None:
        raise ValueError("give splits or v_per_split, not both")
    if block is not None and block & (block - 1):
        raise ValueError(f"block must be a power of two (tl.arange); got {block}")
    previous, _forced = _forced, Forced(splits, v_per_split, block)
    try:
        yield _forced
    finally:
        _forced = previous


def row_block(vocab, largest):
    """Vocabulary columns per program of a row kernel: the whole row up to `largest`."""
    if _forced is not None and _forced.block is not None:
        return _forced.block
    return min(largest, triton.next_power_of_2(vocab))


def forced_block():
    """The row kernels' vocabulary block forced by `forced` (tests), or None."""
    return None if _forced is None else _forced.block


def row_configs():
    """(BLOCK_V, warps) of the memory-bound row kernels: small blocks of few warps keep the
    registers low and many programs an SM, so that loads stay in flight. Quick mode keeps two."""
    shapes = [(2048, 4), (1024, 4), (4096, 8), (1024, 2)]
    if autotune_mode() == "quick":
        shapes = shapes[:2]
    return [triton.Config({"BLOCK_V": v}, num_warps=w) for v, w in shapes]


def vocabulary_splits(n_rows, vocab, device):
    """(splits, columns per split) of a streaming pass over the vocabulary: enough
    (row block of 128, split) programs to fill the GPU twice when few rows count."""
    import torch

    if _forced is not None and (_forced.splits or _forced.v_per_split):
        v_per_split = _forced.v_per_split or triton.cdiv(vocab, _forced.splits)
        return triton.cdiv(vocab, v_per_split), v_per_split
    programs = 2 * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2)
    splits = max(1, min(triton.cdiv(programs, triton.cdiv(n_rows, 128)), triton.cdiv(vocab, 2048)))
    v_per_split = triton.cdiv(triton.cdiv(vocab, splits), 256) * 256
    return triton.cdiv(vocab, v_per_split), v_per_split
