"""Launch configurations. Under TRITON_INTERPRET=1 (CPU) a single small config
keeps CI fast; on a GPU the autotuner picks among tensor-core friendly tiles."""
import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(shapes):
    if interpreting():
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16}, num_warps=1)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_K": k}, num_warps=w, num_stages=st)
            for n, v, k, w, st in shapes]


# Pruned with the sm_90 compile report (python tests/compile_for_hopper.py --profile): every
# config runs its GEMM on wgmma with 16-byte async copies, and those that spilled hundreds
# of bytes of registers to the stack (a 128 x 256 or a 128 x 128 tile at 4 warps in the
# statistics kernel, where the online-softmax epilogue shares registers with the
# accumulator) are gone. Which of the rest is fastest is the autotuner's call on the GPU.
def stats_configs():
    return _configs([(128, 128, 64, 8, 3), (64, 256, 64, 8, 4), (64, 128, 64, 8, 4), (128, 64, 64, 8, 4)])


def grad_configs():
    return _configs([(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)])


def pair_configs():
    # Two fp32 logit tiles (policy and reference) are live at once, so the tiles are
    # half the core kernels' (no spills at 8 warps; 8192-element tiles at 4 warps and
    # 128 x 128 at 8 spilled ~380 bytes in the statistics kernel).
    return _configs([(64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 4), (64, 128, 64, 8, 4)])


def vocabulary_splits(n_rows, vocab, device):
    """(splits, columns per split) of a streaming pass over the vocabulary: enough
    (row block of 128, split) programs to fill the GPU twice when few rows count."""
    import torch

    programs = 2 * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2)
    splits = max(1, min(triton.cdiv(programs, triton.cdiv(n_rows, 128)), triton.cdiv(vocab, 2048)))
    v_per_split = triton.cdiv(triton.cdiv(vocab, splits), 256) * 256
    return triton.cdiv(vocab, v_per_split), v_per_split
