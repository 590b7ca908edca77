"""Multi-process training under torchrun: FSDP2 sharding, each rank's share of a step, global sums.

    torchrun --nproc_per_node 8 -m prefops.tools.cli train CONFIG.yaml [--key value ...]
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        -m prefops.tools.cli train CONFIG.yaml

micro_batch_size is per rank: a step holds micro_batch_size * grad_accum_steps *
world_size examples, and rank r trains on the r-th contiguous slice of them. With
data_parallel: fsdp (the default) the decoder layers and then the whole model (body +
head, see model.FusedLM) are FSDP2 units, so the lm_head weight is all-gathered for
the fused loss and its gradient reduce-scattered like any other. With data_parallel:
ddp the FusedLM is wrapped in DistributedDataParallel: every rank holds the whole
model, and since the head is read inside FusedLM's forward, the call through the
wrapper arms DDP's reducer for the lm_head weight too. Loss normalisers (pairs,
tokens, KTO's KL sums) are all-reduced before the backward pass and gradients are
summed, not averaged, over ranks: the step's gradient equals that of one process on
the whole global batch. Without torchrun (WORLD_SIZE unset or 1) everything here is
a no-op.

Context parallelism (config context_parallel: N > 1): consecutive groups of N
ranks each share one data-parallel rank. Every rank of a group collates the same
micro-batches and runs a contiguous 1/N of each one's tokens (model.context_shard);
the losses all-reduce their per-sequence sums within the group, so every rank of it
computes the same loss, metrics and counts, and rank(), world_size() and the sums,
gathers and shares here are those of data parallelism (one rank per group).
Gradients still go to FSDP2 over all ranks: each rank's share of a micro-batch's
gradient is a partial sum, and their sum over the world is the step's gradient.

Tensor parallelism (config tensor_parallel: N, exactly N processes): every rank runs
every micro-batch with its split of the weights (transformers' tp_plan auto; the
lm_head along the vocabulary, prefops.vocab_parallel). There is one data-parallel
rank, so rank(), world_size() and the sums here are those of one process, and no
FSDP2: each weight's gradient is already its rank's split of the whole gradient.
"""
from __future__ import annotations

import contextlib
import inspect
import os

import torch
import torch.distributed as dist


def initialise() -> None:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPUs), once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# set_context_parallel's groups: the size of a context-parallel group, this rank's group (None without
# context parallelism) and the group of the ranks holding the same share in every context-parallel group.
_CONTEXT = {"size": 1, "group": None, "data": None}
DATA_PARALLEL = ("fsdp", "ddp")
_DATA_PARALLEL = {"mode": "fsdp"}


def set_data_parallel(mode: str) -> None:
    """How `parallel` spreads the model over the ranks: fsdp (FSDP2 shards) or ddp (a copy per rank)."""
    if mode not in DATA_PARALLEL:
        raise ValueError(f"data_parallel must be one of {', '.join(DATA_PARALLEL)}; got {mode!r}")
    _DATA_PARALLEL["mode"] = mode


def sharding() -> bool:
    """Whether models are FSDP2-sharded over the ranks (collectives gather them), rather than whole on each."""
    return active() and _DATA_PARALLEL["mode"] == "fsdp"


def set_context_parallel(size: int) -> None:
    """Form the context-parallel groups of `size` consecutive ranks (1: none); every rank must call it."""
    _CONTEXT.update(size=1, group=None, data=None)
    if size == 1:
        return
    processes = dist.get_world_size() if active() else 1
    if processes % size:
        raise ValueError(f"context_parallel: {size} needs a multiple of {size} processes (torchrun "
                         f"--nproc_per_node), or context_parallel: 1; this run has {processes}")
    me = dist.get_rank()
    for first in range(0, processes, size):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(first, first + size)))
        if first <= me < first + size:
            _CONTEXT["group"] = group
    for offset in range(size):
        group = dist.new_group(list(range(offset, processes, size)))
        if me % size == offset:
            _CONTEXT["data"] = group
    _CONTEXT["size"] = size


# set_tensor_parallel's size: the ranks every weight is split over (1: none).
_TENSOR = {"size": 1}


def set_tensor_parallel(size: int) -> None:
    """Tensor parallelism over all `size` processes (1: none): one data-parallel rank whose every rank runs
    the same batches with its split of the weights (model.build loads them with transformers' tp_plan auto);
    every rank must call it, after set_context_parallel."""
    _TENSOR["size"] = 1
    if size == 1:
        return
    processes = dist.get_world_size() if active() else 1
    if processes != size:
        raise ValueError(f"tensor_parallel: {size} needs exactly {size} processes (torchrun --nproc_per_node "
                         f"{size}); data parallelism beside it is not supported yet; this run has {processes}")
    me = dist.get_rank()
    for rank_ in range(size):  # the data-parallel group of each rank is itself: sums over it are its own
        group = dist.new_group([rank_])
        if rank_ == me:
            _CONTEXT.update(size=size, group=None, data=group)
    _TENSOR["size"] = size


def tensor_parallel() -> int:
    """The number of ranks the weights are split over (1: none)."""
    return _TENSOR["size"]


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, also for tensor-parallel models, whose gradients mix DTensors (sharded
    or replicated over the ranks) and plain tensors (replicated), which torch's foreach norm refuses."""
    parameters = [p for p in parameters if p.grad is not None]
    if tensor_parallel() == 1:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    from torch.distributed.tensor import DTensor, Shard

    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for parameter in parameters:
        grad = parameter.grad
        if isinstance(grad, DTensor) and any(isinstance(p, Shard) for p in grad.placements):
            sharded += grad.to_local().double().square().sum().cpu()
        else:
            replicated += (grad.to_local() if isinstance(grad, DTensor) else grad).double().square().sum().cpu()
    dist.all_reduce(sharded)  # every process is in the one tensor-parallel group
    total = (sharded + replicated).sqrt().float()
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for parameter in parameters:
        grad = parameter.grad
        (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(coefficient.to(grad.device))
    return total


def context_group():
    """This rank's context-parallel ProcessGroup, or None."""
    return _CONTEXT["group"]


def rank() -> int:
    """This rank's data-parallel rank: which share of a step's examples it trains on."""
    return dist.get_rank() // _CONTEXT["size"] if active() else 0


def world_size() -> int:
    """The number of data-parallel ranks (processes / context_parallel)."""
    return dist.get_world_size() // _CONTEXT["size"] if active() else 1


def is_main() -> bool:
    return not active() or dist.get_rank() == 0


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shard_of(indices: list[int]) -> list[int]:
    """This rank's contiguous slice of a global step's example indices."""
    size = len(indices) // world_size()
    return indices[rank() * size:(rank() + 1) * size]


def parallel(lm: torch.nn.Module) -> torch.nn.Module:
    """The trained FusedLM under torchrun: sharded in place (fsdp) or wrapped in DDP (ddp); itself otherwise."""
    if sharding():
        shard(lm)
        return lm
    return replicate(lm) if active() else lm


def _summed(state, bucket):
    """DDP's gradient all-reduce as a plain sum: the loss is already divided by the global normaliser."""
    reduced = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return reduced.then(lambda future: future.value()[0])


def replicate(lm: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel over every rank, summing gradients. Buffers are not synced in each forward:
    the only ones (rotary frequencies) are computed alike on every rank, and the evaluation's forwards
    under no_grad need not be matched by collectives on every rank."""
    from torch.nn.parallel import DistributedDataParallel

    device = local_device()
    # torch 2.13 renamed the switch (the old name warns); both still sync the buffers once, at wrapping.
    named = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    wrapped = DistributedDataParallel(lm, device_ids=[device] if device.type == "cuda" else None,
                                      **{"forward_sync_buffers" if named else "broadcast_buffers": False})
    wrapped.register_comm_hook(None, _summed)
    return wrapped


def shard(lm: torch.nn.Module) -> None:
    """FSDP2 over every decoder layer, then over the whole FusedLM (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for layer in lm.model.get_decoder().layers:
        fully_shard(layer)
    fully_shard(lm)
    # The loss is already divided by the global normaliser: every unit sums gradients over ranks rather
    # than averaging them, with a plain SUM (which gloo supports, unlike NCCL's pre-multiplied sum).
    for module in lm.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def sharded(lm: torch.nn.Module) -> bool:
    return hasattr(lm, "set_requires_gradient_sync")


def set_gradient_sync(lm: torch.nn.Module, sync: bool) -> None:
    """Reduce gradients over the ranks only in a step's last backward (accumulate locally before it)."""
    if sharded(lm):
        lm.set_requires_gradient_sync(sync)
    elif hasattr(lm, "require_backward_grad_sync"):  # DDP: what its no_sync() context sets
        lm.require_backward_grad_sync = sync


def all_reduce_sums(values: dict) -> dict:
    """Sum a dict of numbers (floats or scalar tensors) over the data-parallel ranks; returns floats."""
    if not active():
        return {key: float(value) for key, value in values.items()}
    keys = sorted(values)
    device = local_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    packed = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed, group=_CONTEXT["data"])
    return dict(zip(keys, packed.tolist()))


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of every data-parallel rank along dim 0."""
    if not active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous(), group=_CONTEXT["data"])
    return torch.cat(parts)


def all_gather_objects(value) -> list:
    """Every data-parallel rank's picklable value, in rank order."""
    if not active():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value, group=_CONTEXT["data"])
    return values


def broadcast(value):
    """Rank 0's picklable value on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def as_float(value) -> float:
    """A scalar tensor's value; a DTensor (a gradient norm under FSDP2) is gathered first."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


def model_state(model: torch.nn.Module) -> dict:
    """The full (unsharded) state dict on CPU; every rank must call it, rank 0 gets the tensors."""
    if not active():
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    if not active():
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model_state(model: torch.nn.Module, state: dict) -> None:
    """Load a full state dict; under torchrun rank 0's copy is scattered to every rank's shards."""
    if not active():
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    # A copy: set_model_state_dict writes this rank's shards back into the dict it is given.
    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    if not active():
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


@contextlib.contextmanager
def unsharded(lm: torch.nn.Module):
    """Gather the root unit's parameters (embeddings, norm, lm_head) so the inner model can be
    called directly, e.g. by generate(); the decoder layers gather themselves as usual."""
    if not sharded(lm):
        yield
        return
    lm.unshard()
    try:
        yield
    finally:
        lm.reshard()


def barrier() -> None:
    if active():
        dist.barrier()


def full_model_state(model: torch.nn.Module) -> dict:
    """The full state dict on every rank (on its device), for a local unsharded copy of the model."""
    if not active():
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
