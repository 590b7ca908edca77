"""Allocation recording: every storage an op allocates, inside prefops' custom ops too.

Used by the memory tests (no N x V tensor, nothing over budget) and the demo (peak bytes).
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .ops import IMPLEMENTATIONS


class AllocationRecorder(TorchDispatchMode):
    """Records (bytes, elements, op) of each new storage, and the peak of live bytes."""

    def __init__(self):
        super().__init__()
        self.sizes, self.live, self.peak = [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        implementation = IMPLEMENTATIONS.get(func._schema.name)
        if implementation is not None:
            with self:  # step inside the opaque custom op
                return implementation(*args, **kwargs)
        out = func(*args, **kwargs)
        # Views and in-place results reuse an input's storage: they allocate nothing.
        inputs = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and _storage(tensor) not in inputs:
                nbytes = tensor.untyped_storage().nbytes()
                self.sizes.append((nbytes, tensor.numel(), str(func)))
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor.untyped_storage(), self._free, nbytes)
        return out

    def _free(self, nbytes):
        self.live -= nbytes


def _storage(tensor):
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()
