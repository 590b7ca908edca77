"""Count the aten ops a piece of code launches and the ones that make the host wait for the device.

A loss head runs a few dozen tiny ops on [P]-sized tensors while the GPU is busy with GEMMs that
take milliseconds. The CPU stays ahead of the GPU and the head costs only its kernels' few
microseconds each, unless some op needs a value on the host: then the CPU waits for the queued
GEMMs, and the GPU idles while the CPU issues everything after it one op at a time. Both counts
are device-independent, so they are measured on CPU: tests/test_head_overhead.py holds them to
their bars and benchmarks/bench_head_overhead.py reports them.
"""
from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result (a value, or an output shape) the host needs from the device: a sync on CUDA.
SYNC_OPS = frozenset({
    "aten._local_scalar_dense",  # .item(), bool(t), int(t), float(t), `if t:`
    "aten.is_nonzero", "aten.equal", "aten.allclose",
    "aten.nonzero", "aten.masked_select", "aten.masked_scatter", "aten.masked_scatter_",
    "aten._unique", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
    "aten.bincount", "aten.histc",
})


def _is_sync(func, args, kwargs) -> bool:
    name = func.overloadpacket._qualified_op_name.replace("::", ".")
    if name in SYNC_OPS:
        return True
    if name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
        # A boolean mask as an index becomes nonzero(): an output shape the host must read.
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    if name == "aten.repeat_interleave" and isinstance(args[0], torch.Tensor) and args[0].dim() == 1:
        return kwargs.get("output_size") is None  # the output length is the sum of the repeats
    if name == "aten.lift_fresh":
        # A tensor made from Python data (torch.tensor, as_tensor of a number, new_tensor): bound for
        # a GPU, it is a copy from pageable host memory, which PyTorch follows by a stream sync.
        return True
    if name in ("aten._to_copy", "aten.copy_"):
        # Across devices: .cpu() waits for the device; a blocking .to("cuda") syncs the stream after its copy.
        source = args[1] if name == "aten.copy_" else args[0]
        target = args[0].device if name == "aten.copy_" else kwargs.get("device")
        return (isinstance(source, torch.Tensor) and target is not None and torch.device(target) != source.device
                and not kwargs.get("non_blocking", False) and "meta" not in (source.device.type, str(target)))
    return False


class OpCounter(TorchDispatchMode):
    """with OpCounter() as count: ... -> count.ops (every aten op but views, in order) and
    count.syncs (those of them that wait for the device, plus every Tensor.tolist() call: on CPU
    it reads memory directly, on CUDA it is a device-to-host copy)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.syncs: list[str] = []
        self._tolist = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        # Views and metadata ops launch no kernel; they are free on every device.
        if not (func.is_view or name in ("aten.detach", "aten.alias")):
            self.ops.append(name)
        if _is_sync(func, args, kwargs):
            self.syncs.append(name)
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter, tolist = self, self._tolist

        def recorded_tolist(tensor):
            counter.syncs.append("Tensor.tolist")
            return tolist(tensor)

        torch.Tensor.tolist = recorded_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def summary(self) -> str:
        """The syncs by name, for an assertion message."""
        return ", ".join(f"{name} x{n}" for name, n in collections.Counter(self.syncs).items()) or "none"

