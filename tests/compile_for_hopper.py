"""Compile every Triton kernel in prefops.kernels for an H100 (sm_90) without a GPU.

The CPU interpreter accepts code the GPU compiler rejects (a plain Python global
inside a kernel, a dtype mismatch in a loop-carried value, ...), so CI compiles
each kernel to a cubin with triton's bundled ptxas: every autotune config with
the default switches, then every switch flipped once. Run in a process without
TRITON_INTERPRET (tests/test_kernels_compile.py does that). Prints one line per
compiled variant and exits non-zero on the first failure.

With --profile it instead compiles each autotune config the way a launch on real
shapes does (pointers and the hidden size, vocabulary and strides specialised as
multiples of 16; no bias or softcap; log p alone) and reports, from the SASS, what
decides a tile kernel's speed on the chip: shared memory, registers, spilled stack
bytes, wgmma (HGMMA) instructions, 16-byte asynchronous copies and scalar 2-byte
loads and stores. A tile kernel (one with a BLOCK_K loop) fails the profile when it
runs its GEMM without wgmma, loads its operands other than by 16-byte asynchronous
copies, writes a half-precision tile 2 bytes at a time, or needs more shared memory
than an H100 block gets.
"""
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

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
# Kernels launched without an autotuner: the block and warps their launchers pass at a large vocabulary.
UNTUNED = {"rows_grad_kernel": triton.Config({"BLOCK_V": 2048}, num_warps=4),
           "rows_kl_grad_kernel": triton.Config({"BLOCK_V": 2048}, num_warps=4)}


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


def launch_configs(name, kernel):
    return kernel.configs if hasattr(kernel, "configs") else [UNTUNED[name]]


def default_switches(fn):
    return {p.name: DEFAULTS.get(p.name, True) for p in fn.params if p.is_constexpr and not p.name.startswith("BLOCK_")}


def variants(name, kernel, fn):
    switches = default_switches(fn)
    blocks = [c.kwargs for c in launch_configs(name, kernel)]
    for block in blocks:
        yield {**switches, **block}
    for switch, value in switches.items():
        for change in VARIANTS.get(switch, [((switch, not value),)] if isinstance(value, bool) else []):
            yield {**switches, **dict(change), **blocks[0]}


# Integers a real launch passes as multiples of 16 (H and V of every released model, their
# row strides, the split width, the width of a gradient tile: see fused.plan_chunks), which
# Triton's launcher specialises on.
ALIGNED_INTS = ("hidden", "ref_hidden_size", "vocab_size", "v_per_split", "v_count", "stride_")
# The training path: no bias or softcap, log p without the optional statistics.
PROFILE_SWITCHES = {"ENTROPY": False, "SUM_P2": False, "LOGIT_SUM": False}
SHARED_MEMORY_PER_BLOCK = 227 * 1024


def launch_attrs(fn):
    return {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
            if not p.is_constexpr and (p.name.endswith("_ptr") or p.name.startswith(ALIGNED_INTS))}


def resources(compiled):
    """What the compiler made of one config: {smem, regs, stack, hgmma, copy16, scalar16}."""
    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", cubin.name], capture_output=True, text=True, check=True).stdout
    return {"smem": compiled.metadata.shared, "regs": int(re.search(r"REG:(\d+)", usage).group(1)),
            "stack": int(re.search(r"STACK:(\d+)", usage).group(1)), "hgmma": sass.count("HGMMA"),
            "copy16": len(re.findall(r"LDGSTS\S*\.128", sass)), "scalar16": len(re.findall(r"LDG\S*\.U16", sass)),
            "store16": len(re.findall(r"STG\S*\.U16", sass))}


def profile_problems(fn, usage):
    if "BLOCK_K" not in fn.arg_names:
        return []
    return [problem for problem, bad in (
        ("no wgmma", usage["hgmma"] == 0), ("no 16-byte async copies", usage["copy16"] == 0),
        ("scalar 2-byte loads", usage["scalar16"] > 0), ("scalar 2-byte stores", usage["store16"] > 0),
        ("too much shared memory", usage["smem"] > SHARED_MEMORY_PER_BLOCK)) if bad]


def profile():
    failed = False
    for name, kernel in kernels():
        fn = jit_function(kernel)
        switches = {switch: False if switch.startswith("HAS_") else PROFILE_SWITCHES.get(switch, value)
                    for switch, value in default_switches(fn).items()}
        for config in launch_configs(name, kernel):
            source = ASTSource(fn=fn, signature=signature(name, fn), constexprs={**switches, **config.kwargs},
                               attrs=launch_attrs(fn))
            compiled = triton.compile(source, target=HOPPER,
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages})
            usage = resources(compiled)
            problems = profile_problems(fn, usage)
            failed |= bool(problems)
            blocks = "x".join(str(v) for v in config.kwargs.values())
            print(f"{'FAILED' if problems else 'profile'} {name} {blocks} warps={config.num_warps} "
                  f"stages={config.num_stages} " + " ".join(f"{k}={v}" for k, v in usage.items())
                  + (f" ({', '.join(problems)})" if problems else ""), flush=True)
    return 1 if failed else 0


def main():
    if "--profile" in sys.argv[1:]:
        return profile()
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
