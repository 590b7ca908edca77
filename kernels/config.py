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


def stats_configs():
    return _configs([(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4), (128, 128, 64, 4, 4)])


def grad_configs():
    return _configs([(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)])
