"""Compile every Triton kernel in prefops.kernels for an H100 (sm_90) without a GPU.

The CPU interpreter accepts code the GPU compiler rejects (a plain Python global
inside a kernel, a dtype mismatch in a loop-carried value, ...), so CI compiles
each kernel to a cubin with triton's bundled ptxas: every autotune config with
the default switches, then every switch flipped once. Run in a process without
TRITON_INTERPRET (tests/test_kernels_compile.py does that). Prints one line per
compiled variant and exits non-zero on the first failure.
"""
import importlib
import os
import pkgutil
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import prefops.kernels  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
INT_POINTERS = {"rows_ptr", "targets_ptr", "top_ids_ptr"}
# Pointers to hidden states, weights, biases and logit tiles: bf16 as in training.
HALF_POINTERS = {"h_ptr", "w_ptr", "b_ptr", "rh_ptr", "rw_ptr", "rb_ptr", "ha_ptr", "wa_ptr", "ba_ptr", "hb_ptr",
                 "wb_ptr", "bb_ptr", "logits_ptr", "ref_logits_ptr", "logits_a_ptr", "logits_b_ptr"}
# Kernels whose out_ptr receives a tile of logit gradients in the input dtype.
HALF_OUTPUT = {"logits_grad_kernel", "token_kl_grad_kernel"}
FLOAT_SCALARS = {"inv_temperature", "softcap"}
# Switches that are off by default (everything else named HAS_* / *_FIRST is tried on and off).
DEFAULTS = {"IEEE": False, "UPCAST": False, "TOP_K": 0, "TOP_KP": 1}
VARIANTS = {"TOP_K": [(("TOP_K", 10), ("TOP_KP", 16))], "IEEE": [(("IEEE", True),)]}
UNTUNED_BLOCKS = {"rows_stats_kernel": {"BLOCK_V": 4096}, "rows_grad_kernel": {"BLOCK_V": 2048},
                  "rows_kl_stats_kernel": {"BLOCK_V": 4096}, "rows_kl_grad_kernel": {"BLOCK_V": 2048}}


def kernels():
    for info in pkgutil.iter_modules(prefops.kernels.__path__):
        module = importlib.import_module(f"prefops.kernels.{info.name}")
        for name, obj in sorted(vars(module).items()):
            if isinstance(jit_function(obj), triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                yield name, obj


def jit_function(obj):
    """The JITFunction under an autotuner; a plain @triton.jit kernel is one itself (its .fn is the Python source)."""
    return obj.fn if isinstance(obj, triton.runtime.Autotuner) else obj


def signature(name, fn):
    types = {}
    for param in fn.params:
        if param.is_constexpr:
            types[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            half = param.name in HALF_POINTERS or (param.name == "out_ptr" and name in HALF_OUTPUT)
            types[param.name] = "*i32" if param.name in INT_POINTERS else "*bf16" if half else "*fp32"
        else:
            types[param.name] = "fp32" if param.name in FLOAT_SCALARS else "i32"
    return types


def variants(name, kernel, fn):
    switches = {p.name: DEFAULTS.get(p.name, True) for p in fn.params
                if p.is_constexpr and not p.name.startswith("BLOCK_")}
    blocks = [c.kwargs for c in kernel.configs] if hasattr(kernel, "configs") else [UNTUNED_BLOCKS[name]]
    for block in blocks:
        yield {**switches, **block}
    for switch, value in switches.items():
        for change in VARIANTS.get(switch, [((switch, not value),)] if isinstance(value, bool) else []):
            yield {**switches, **dict(change), **blocks[0]}


def main():
    for name, kernel in kernels():
        fn = jit_function(kernel)
        for constants in variants(name, kernel, fn):
            source = ASTSource(fn=fn, signature=signature(name, fn), constexprs=constants)
            try:
                triton.compile(source, target=HOPPER)
            except Exception as error:  # noqa: BLE001 - report any compiler failure with the variant
                print(f"FAILED {name} {constants}: {type(error).__name__}: {error}")
                return 1
            print(f"ok {name} {constants}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
