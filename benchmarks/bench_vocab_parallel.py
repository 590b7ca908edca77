"""Per-rank memory of a vocabulary-sharded preference loss beyond the weights, on CPU gloo ranks (issue 22).

    python benchmarks/bench_vocab_parallel.py                          # tensor-parallel sizes 1, 2, 4
    python benchmarks/bench_vocab_parallel.py --sizes 1,2 --vocab 16000 --tokens 512

Each of N processes holds V/N rows of the lm_head and the same hidden states; it runs forward and backward
of prefops.PreferenceLoss('sigmoid') under prefops.memory.AllocationRecorder, which counts every storage
allocated in that window (the weights and hidden states exist before it, so they are not counted; the
weight gradient of its rows is). The peak of live bytes per rank is printed with its ratio to N = 1's,
and the counted tokens' fp32 logits of its rows. The default strategy, sliced, is the path every sharded
call of strategy auto runs (N = 1 too, for the same path): with the default 2 GiB workspace a whole shard's
logit slice fits, so the peak is that slice (on CPU with about three fp32 temporaries a logit) plus dW.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist

import prefops
from prefops.memory import AllocationRecorder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def inputs(args):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens // args.length, args.length, args.hidden, generator=generator)
    weight = torch.randn(args.vocab, args.hidden, generator=generator) / args.hidden**0.5
    targets = torch.randint(0, args.vocab, (args.tokens // args.length, args.length), generator=generator)
    targets[:, :args.length // 4] = -100  # the prompt
    return hidden, weight, targets


def measure(args, rank, world, group):
    hidden, weight, targets = inputs(args)
    rows = slice(rank * args.vocab // world, (rank + 1) * args.vocab // world)
    hidden, weight = hidden.requires_grad_(), weight[rows].clone().requires_grad_()
    pairs = hidden.shape[0] // 2
    ref = torch.full((pairs,), -1.0e3)
    loss = prefops.PreferenceLoss("sigmoid", beta=0.1, vocab_group=group, strategy=args.strategy)
    recorder = AllocationRecorder()
    with recorder:
        value, _ = loss(hidden, weight, targets, ref_chosen_logps=ref, ref_rejected_logps=ref)
        value.backward()
    return recorder.peak, weight.shape[0], prefops.strategy.last_path()


def _worker(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, *measure(args, rank, world, dist.new_group(list(range(world))))))
    finally:
        dist.destroy_process_group()


def run(args, world):
    if world == 1:
        return [(0, *measure(args, 0, 1, None))]
    context = torch.multiprocessing.get_context("spawn")
    queue = context.SimpleQueue()
    torch.multiprocessing.spawn(_worker, args=(world, _free_port(), args, queue), nprocs=world, join=True)
    return sorted(queue.get() for _ in range(world))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,2,4", help="tensor-parallel sizes (processes)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens in the batch (chosen + rejected)")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--strategy", default="sliced", help="prefops strategy (a sharded call runs sliced or lean)")
    args = parser.parse_args(argv)
    baseline = None
    counted = (args.tokens // args.length) * (args.length - args.length // 4)
    print(f"V {args.vocab}, H {args.hidden}, {args.tokens} tokens ({counted} counted), fp32, CPU, strategy "
          f"{args.strategy}, torch {torch.__version__}")
    print("| N | rank | rows | path | peak beyond the weights (MB) | vs N = 1 | counted x rows x 4 B (MB) |")
    print("|---|---|---|---|---|---|---|")
    for world in (int(size) for size in args.sizes.split(",")):
        for rank, peak, rows, path in run(args, world):
            baseline = baseline or peak
            print(f"| {world} | {rank} | {rows} | {path} | {peak / 1e6:.1f} | {peak / baseline:.2f} | "
                  f"{counted * rows * 4 / 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
