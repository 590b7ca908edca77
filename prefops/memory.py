"""Allocation recording: every storage an op allocates, inside prefops' custom ops too.

Used by the memory tests (the peak of live bytes within the workspace or the budget), the
demo and the CPU bench (peak bytes).
"""
import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .ops import IMPLEMENTATIONS


class AllocationRecorder(TorchDispatchMode):
    """Records each allocation as sizes (bytes, elements, op), the live bytes (allocated minus
    freed, of the storages allocated while recording) and their peak.

    Views and in-place results share an input's storage and allocate nothing; a storage an
    op grows in place (resize_, out=) counts its growth. at_peak lists (bytes, op, shape) of
    the storages live at the peak, largest first: what made it.
    """

    def __init__(self):
        super().__init__()
        self.sizes, self.live, self.peak, self.at_peak = [], 0, 0, []
        self._live = {}  # storage key -> [bytes counted, op, shape]
        self._depth = 0  # the recorder re-enters itself inside custom ops
        self._unfreeze = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        implementation = IMPLEMENTATIONS.get(func._schema.name)
        if implementation is not None:
            with self:  # step inside the opaque custom op
                return implementation(*args, **kwargs)
        before = {_key(s): s.nbytes() for s in _storages((args, kwargs))}
        out = func(*args, **kwargs)
        seen = set()
        for tensor in (leaf for leaf in tree_leaves((out, args, kwargs)) if isinstance(leaf, torch.Tensor)):
            storage = tensor.untyped_storage()
            if _key(storage) not in seen:
                seen.add(_key(storage))
                grown = storage.nbytes() - before.get(_key(storage), 0)
                if grown > 0:
                    self._allocate(storage, grown, grown // tensor.element_size(), func, tensor.shape)
        return out

    def __enter__(self):
        if not self._depth:
            # What exists before recording is no garbage of the recorded code: collections skip it.
            self._unfreeze = gc.get_freeze_count() == 0
            gc.freeze()
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if not self._depth and self._unfreeze:
            gc.unfreeze()
        return super().__exit__(*exc)

    def _allocate(self, storage, nbytes, numel, func, shape):
        self.sizes.append((nbytes, numel, str(func)))
        if self.live + nbytes > self.peak:
            # Garbage that only a collection frees is not live: Triton's interpreter leaves each
            # launch's arguments in a reference cycle (a recursive closure) that a GPU run never has.
            # Survivors are frozen, so the next collection looks only at newer objects (what a lazy
            # import brings in would otherwise cost every collection a tenth of a second); a cycle
            # still in use then stays counted until the recording ends: an overcount, never a miss.
            gc.collect()
            gc.freeze()
        key = _key(storage)
        if key not in self._live:
            self._live[key] = [0, str(func), tuple(shape)]
            weakref.finalize(storage, self._free, key)
        self._live[key][0] += nbytes
        self.live += nbytes
        if self.live > self.peak:
            self.peak = self.live
            self.at_peak = sorted((tuple(entry) for entry in self._live.values()), key=lambda entry: -entry[0])

    def _free(self, key):
        self.live -= self._live.pop(key)[0]

    def describe_peak(self, top=8):
        """The largest storages live at the peak, one per line."""
        return "\n".join(f"{nbytes:>10} B  {op} {list(shape)}" for nbytes, op, shape in self.at_peak[:top])


def _storages(tree):
    """The distinct storages of the tensors (and bare storages, as set_ takes) in a pytree."""
    found = {}
    for leaf in tree_leaves(tree):
        storage = leaf.untyped_storage() if isinstance(leaf, torch.Tensor) else leaf
        if isinstance(storage, torch.UntypedStorage):
            found.setdefault(_key(storage), storage)
    return list(found.values())


def _key(storage):
    # The C++ storage itself, whatever resizes do to its data pointer.
    return storage._cdata
