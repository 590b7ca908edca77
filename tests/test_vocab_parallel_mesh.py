"""Vocabulary parallelism on 2-D meshes of 4 gloo ranks, against one process.

data x tensor: FSDP2 (fully_shard over the data dimension) around a model whose lm_head is torch's
ColwiseParallel over the tensor dimension; inside the forward FSDP2 hands prefops the head as a Shard(0)
DTensor of the tensor mesh. Each data rank runs its own batch; the gradients FSDP2 averages over the
data ranks must be those of the mean of the batches' losses in one process.

context x tensor: each rank holds a share of every sequence's tokens (sequence_group) and some rows of
the lm_head (vocab_group): the loss is the whole batch's, h.grad the single process's rows, and the
weight rows' gradients summed over the context ranks the single process's.
"""
import os

import pytest
import torch
import torch.distributed as dist

import prefops
from conftest import assert_fp32_close
from test_vocab_parallel import spawn, uneven_bounds

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is unavailable")

HIDDEN, VOCAB, BETA = 10, 37, 0.3


class _TinyLM(torch.nn.Module):
    """A linear body and a bias-free lm_head; forward returns the SimPO loss from the fused op."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.body = torch.nn.Linear(HIDDEN, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.7)
        self.loss = prefops.PreferenceLoss("simpo", beta=BETA, gamma_beta_ratio=0.3)

    def forward(self, inputs, targets):
        return self.loss(torch.tanh(self.body(inputs)), self.head.weight, targets)[0]


def _batch(index):
    generator = torch.Generator().manual_seed(10 + index)
    targets = torch.randint(0, VOCAB, (4, 9), generator=generator)
    targets[:, :2] = -100
    targets[1, 7:] = -100
    return torch.randn(4, 9, HIDDEN, generator=generator), targets


def _fsdp_worker(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data", "tensor"))
    model = _TinyLM()
    parallelize_module(model, mesh["tensor"], {"head": ColwiseParallel()})
    fully_shard(model, mesh=mesh["data"])
    loss = model(*_batch(mesh["data"].get_local_rank()))
    loss.backward()
    grads = {name: parameter.grad.full_tensor() for name, parameter in model.named_parameters()}
    torch.save((loss.detach(), grads), os.path.join(out_dir, f"rank{rank}.pt"))


def test_fsdp2_data_by_tensor_mesh_equals_one_process(tmp_path):
    spawn(_fsdp_worker, 4, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(4)]
    model = _TinyLM()
    losses = [model(*_batch(index)) for index in range(2)]
    (sum(losses) / 2).backward()
    for rank, (loss, grads) in enumerate(ranks):
        assert_fp32_close(loss, losses[rank // 2].detach(), 36 + VOCAB, f"loss on rank {rank}")
        for name, parameter in model.named_parameters():
            assert_fp32_close(grads[name], parameter.grad, 72 + VOCAB, f"grad of {name} on rank {rank}")


def _context_case(context_rank):
    """Pairs [2P, T] (sigmoid + sft with token metrics), the columns a context rank holds (None: all)."""
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(6, 13, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator)
    targets = torch.randint(0, VOCAB, (6, 13), generator=generator)
    targets[:, :3] = -100
    targets[2, 10:] = -100
    columns = torch.ones(13, dtype=torch.bool)
    if context_rank is not None:
        middle = (torch.arange(13) >= 4) & (torch.arange(13) < 9)
        columns = middle if context_rank == 1 else ~middle
    return hidden[:, columns], weight, targets[:, columns], columns


def _context_loss(hidden, weight, targets, **groups):
    module = prefops.PreferenceLoss(["sigmoid", "sft"], loss_weights=[1.0, 0.4], beta=BETA, token_metrics=True,
                                    **groups)
    ref = torch.linspace(-3.0, -1.0, 3)
    return module(hidden, weight, targets, ref_chosen_logps=ref, ref_rejected_logps=ref - 0.5)


def _context_worker(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("context", "tensor"))
    context_rank, tensor_rank = mesh["context"].get_local_rank(), mesh["tensor"].get_local_rank()
    hidden, weight, targets, _ = _context_case(context_rank)
    bounds = uneven_bounds(VOCAB, 2)
    hidden = hidden.clone().requires_grad_()
    weight = weight[bounds[tensor_rank]:bounds[tensor_rank + 1]].clone().requires_grad_()
    loss, metrics = _context_loss(hidden, weight, targets, sequence_group=mesh["context"].get_group(),
                                  vocab_group=mesh["tensor"].get_group())
    loss.backward()
    grad_w = weight.grad.clone()
    dist.all_reduce(grad_w, group=mesh["context"].get_group())  # the weight's shares over the context ranks
    torch.save((loss.detach(), {k: float(v) for k, v in metrics.items()}, hidden.grad, grad_w, context_rank,
                tensor_rank), os.path.join(out_dir, f"rank{rank}.pt"))


def test_context_by_tensor_mesh_equals_one_process(tmp_path):
    spawn(_context_worker, 4, str(tmp_path))
    hidden, weight, targets, _ = _context_case(None)
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = _context_loss(hidden, weight, targets)
    loss.backward()
    bounds = uneven_bounds(VOCAB, 2)
    terms = 78 + VOCAB
    for rank in range(4):
        rank_loss, rank_metrics, grad_h, grad_w, context_rank, tensor_rank = torch.load(tmp_path / f"rank{rank}.pt")
        assert_fp32_close(rank_loss, loss.detach(), terms, f"loss on rank {rank}")
        for name, value in metrics.items():
            assert_fp32_close(torch.tensor(rank_metrics[name]), value.detach().float(), terms, f"{name} on {rank}")
        columns = _context_case(context_rank)[3]
        assert_fp32_close(grad_h, hidden.grad[:, columns], terms, f"h.grad on rank {rank}")
        rows = slice(bounds[tensor_rank], bounds[tensor_rank + 1])
        assert_fp32_close(grad_w, weight.grad[rows], terms, f"W.grad rows on rank {rank}")
