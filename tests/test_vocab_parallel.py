"""Vocabulary parallelism on 2 and 4 gloo ranks: each rank holds some rows of the lm_head (odd, uneven
splits), the same hidden states and targets, and must get the whole vocabulary's per-token outputs, the
full gradient of the hidden states and its own rows' weight and bias gradients, as float64 from the
definitions gives them for one process holding every row.

Every case puts a target in every rank's rows. The shards come as local tensors with vocab_group=, or
as DTensors with a Shard(0) placement (torch's own split of V over the mesh).
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist

from prefops.ops import token_outputs
from prefops.strategy import last_path
from conftest import grad_tolerance, relative_error, value_tolerance
from helpers import make_inputs, reference64, token_values64, transform64

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is unavailable")

# name: (rows N, hidden H, vocabulary V, options of the call, strategy, backend, DTensor weight)
TOKEN_CASES = {
    "sliced": (23, 13, 41, {}, "auto", "torch", False),
    "lean_softcap_temperature_bias": (19, 11, 37, {"softcap": 4.0, "temperature": 0.7}, "lean", "torch", False),
    "dtensor_bias": (17, 9, 39, {"temperature": 1.3}, "auto", "torch", True),
    "triton_lean": (9, 8, 29, {"softcap": 3.0}, "lean", "triton", False),
    "triton_sliced_dtensor": (9, 8, 31, {}, "auto", "triton", True),
    "bf16_sliced": (21, 12, 47, {"softcap": 5.0}, "auto", "torch", False),
}
BIAS_CASES = {"lean_softcap_temperature_bias", "dtensor_bias"}
BF16_CASES = {"bf16_sliced"}


def _join(rank, world, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(worker, world, *args):
    torch.multiprocessing.spawn(_run, args=(worker, world, _free_port(), *args), nprocs=world, join=True)


def _run(rank, worker, world, port, *args):
    _join(rank, world, port)
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def uneven_bounds(vocab, world):
    """Row boundaries of `world` shards of unequal sizes (every shard at least 3 rows)."""
    sizes = [vocab // world + (2 if r % 2 else -1) for r in range(world)]
    sizes[-1] += vocab - sum(sizes)
    return [sum(sizes[:r]) for r in range(world + 1)]


def dtensor_bounds(vocab, world):
    """torch's Shard(0) split: ceil(V / R) rows per rank, the last rank the rest."""
    chunk = -(-vocab // world)
    return [min(r * chunk, vocab) for r in range(world + 1)]


def token_inputs(name, world):
    """The case's fp32 inputs, a target at the first row of every shard, the shard bounds and the upstream
    gradients of logp, lse and entropy."""
    n, hidden_size, vocab, _, _, _, dtensor = TOKEN_CASES[name]
    hidden, weight, targets, bias = make_inputs(n, hidden_size, vocab, scale=3.0, bias=name in BIAS_CASES,
                                                seed=len(name) * 7 + world,
                                                dtype=torch.bfloat16 if name in BF16_CASES else torch.float32)
    bounds = (dtensor_bounds if dtensor else uneven_bounds)(vocab, world)
    targets[1:1 + world] = torch.tensor(bounds[:-1])
    upstream = [torch.randn(n, generator=torch.Generator().manual_seed(world + k), dtype=torch.float64)
                for k in range(3)]
    return hidden, weight, targets, bias, bounds, upstream


def shard_leaves(weight, bias, bounds, rank, dtensor):
    """This rank's weight and bias as leaves that take gradients: DTensors or local rows."""
    if dtensor:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        return [None if x is None else distribute_tensor(x, mesh, [Shard(0)]).requires_grad_() for x in (weight, bias)]
    rows = slice(bounds[rank], bounds[rank + 1])
    return [None if x is None else x[rows].clone().requires_grad_() for x in (weight, bias)]


def local(value):
    return value.to_local() if hasattr(value, "to_local") else value


def _token_worker(rank, world, out_dir):
    group = dist.new_group(list(range(world)))
    results = {}
    for name, (_, _, _, options, strategy, backend, dtensor) in TOKEN_CASES.items():
        hidden, weight, targets, bias, bounds, upstream = token_inputs(name, world)
        hidden = hidden.clone().requires_grad_()
        w, b = shard_leaves(weight, bias, bounds, rank, dtensor)
        outputs = token_outputs(hidden, w, targets, bias=b, strategy=strategy, backend=backend,
                                        vocab_group=None if dtensor else group, **options)
        path = last_path()
        sum(out.double().mul(u).sum() for out, u in zip(outputs[:3], upstream)).backward()
        results[name] = ([out.detach() for out in outputs], hidden.grad, local(w.grad),
                         None if b is None else local(b.grad), path)
    _bad_inputs(group, world)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _bad_inputs(group, world):
    """Each raises on every rank alike, naming the argument and what is allowed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    hidden, weight, targets, _ = make_inputs(5, 4, 4 * world, seed=3)
    mesh = init_device_mesh("cpu", (world,))
    with pytest.raises(ValueError, match=r"weight as a DTensor must be Shard\(0\)"):
        token_outputs(hidden, distribute_tensor(weight, mesh, [Replicate()]), targets)
    with pytest.raises(TypeError, match="its bias must be a DTensor sharded alike"):
        token_outputs(hidden, distribute_tensor(weight, mesh, [Shard(0)]), targets, bias=weight[:, 0])
    with pytest.raises(TypeError, match="vocab_group must be a torch.distributed.ProcessGroup"):
        token_outputs(hidden, weight[:4], targets, vocab_group=mesh)
    targets[2] = 4 * world  # one past the whole vocabulary, which no shard holds
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, {4 * world}\)"):
        token_outputs(hidden, weight[:4], targets, vocab_group=group)


@pytest.mark.parametrize("world", [2, 4])
def test_token_outputs_equal_one_process(tmp_path, world):
    spawn(_token_worker, world, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    for name, (n, hidden_size, vocab, options, strategy, _, _) in TOKEN_CASES.items():
        hidden, weight, targets, bias, bounds, upstream = token_inputs(name, world)
        expected, grads, sizes, logit_size = reference64(hidden, weight, bias, targets, upstream, return_lse=True,
                                                         return_entropy=True, **options)
        z = transform64(hidden.double() @ weight.double().t() + (0.0 if bias is None else bias.double()),
                        **options)
        counted = targets != -100
        sum_p2, logit_sum = token_values64(z, targets)[3:]
        top1 = counted & (z.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) >= z.max(1).values)
        tolerance = value_tolerance(hidden_size, vocab)
        grad_limit = grad_tolerance(hidden.dtype, hidden_size, vocab, n, logit_size)
        for rank, result in enumerate(ranks):
            outputs, grad_h, grad_w, grad_b, path = result[name]
            assert path == ("lean" if strategy == "lean" else "sliced"), (name, path)
            for label, actual, reference in zip(("logp", "lse", "entropy", "sum_p2", "mean_logit"), outputs,
                                                (*expected, sum_p2, logit_sum / vocab)):
                assert relative_error(actual, reference) <= tolerance, (name, rank, label)
            assert torch.equal(outputs[5], top1), (name, rank, "top1")
            assert relative_error(grad_h, grads[0], scale=sizes[0]) <= grad_limit, (name, rank, "grad of hidden")
        rows = [slice(bounds[r], bounds[r + 1]) for r in range(world)]
        for index, label in ((2, "weight"), (3, "bias")):
            if index == 3 and bias is None:
                continue
            joined = torch.cat([ranks[r][name][index] for r in range(world)])
            assert joined.shape[0] == vocab and all(ranks[r][name][index].shape[0] == rows[r].stop - rows[r].start
                                                    for r in range(world)), (name, label)
            assert relative_error(joined, grads[index - 1], scale=sizes[index - 1]) <= grad_limit, \
                (name, "grad of " + label)
