"""Launch every Triton kernel once at small, odd shapes, for compute-sanitizer's memcheck and racecheck.

    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_kernels.py     # GPU; benchmarks/sanitize.sh
    python benchmarks/sanitize_kernels.py --device cpu                          # CI: TRITON_INTERPRET=1

Each op runs forward and backward on the paths that launch the kernels: lean (logits_stats,
logits_grad, token_kl_stats, token_kl_grad), sliced (rows_stats, rows_grad, rows_kl), stored and
chunked (the row kernels on whole chunks) and the diagnostics' streamed top-k (topk_stats). Shapes
are odd (no dimension a multiple of a block) with bias and softcap, so that every masked edge is
exercised. It prints one line per op and the path it ran; the sanitizer reports any access error.
"""
import argparse
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import prefops
    from prefops import strategy

    device, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    n, hidden_size, ref_hidden_size, vocab = 37, 72, 40, 1031

    def tensor(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    hidden, weight, bias = tensor(n, hidden_size), tensor(vocab, hidden_size, scale=0.3), tensor(vocab)
    ref_hidden, ref_weight = tensor(n, ref_hidden_size), tensor(vocab, ref_hidden_size, scale=0.3)
    targets = torch.randint(0, vocab, (n,), generator=generator).to(device)
    targets[::5] = -100
    for leaf in (hidden, weight, bias):
        leaf.requires_grad_()
    options = dict(bias=bias, softcap=20.0, temperature=0.9, backend="triton")
    # A workspace small enough for several row chunks and vocabulary slices at this shape.
    with prefops.settings(workspace=64 << 10):
        for name in ("lean", "sliced"):
            out = prefops.linear_logprobs(hidden, weight, targets, strategy=name, return_entropy=True, **options)
            (out.logp.sum() + out.entropy.sum()).backward()
            print(f"linear_logprobs: {strategy.last_path()}", flush=True)
            kl = prefops.linear_token_kl(hidden, weight, ref_hidden, ref_weight, targets=targets, strategy=name,
                                         **options)
            (kl.kl.sum() + kl.logp.sum()).backward()
            print(f"linear_token_kl: {strategy.last_path()}", flush=True)
    groups = torch.tensor([[0, 1], [2, -1]], device=device)
    seq_ids = (torch.arange(n, device=device) * 3 // n)

    def head(logps, group_index, stats):
        return (logps[:, 0] - logps[:, 1]).sigmoid().sum()

    per_sequence = torch.bincount(seq_ids[targets != -100], minlength=3).tolist()
    largest = max(per_sequence[0] + per_sequence[1], per_sequence[2])
    # stored (everything fits), then chunked: one group's logits and gradient tile, not every gradient.
    for workspace in (1 << 30, largest * vocab * (4 + (2 if dtype != torch.float32 else 0))):
        with prefops.settings(workspace=workspace):
            objective = prefops.sequence_objective(hidden, weight, targets, head=head, groups=groups,
                                                   seq_ids=seq_ids, **options)
            objective.loss.backward()
        print(f"sequence_objective: {strategy.last_path()}", flush=True)
    with torch.no_grad(), prefops.settings(strategy="lean"):
        prefops.linear_diagnostics(hidden, weight, targets, top_k=5, bias=bias, backend="triton")
    print("linear_diagnostics: top-k", flush=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
