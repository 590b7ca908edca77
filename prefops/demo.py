"""The CPU demo: a DPO loss with the fused op against the materialised-logits reference.

Prints the agreement of loss and gradients and the peak memory each path allocated
(recorded tensor by tensor), for a small Llama-like head: 4 pairs x 256 tokens, H 256, V 32000.
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import prefops
from prefops.ops import IMPLEMENTATIONS


class PeakMemory(TorchDispatchMode):
    """Live bytes of every storage allocated inside the block (custom ops included, gradients too), and their peak."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        implementation = IMPLEMENTATIONS.get(func._schema.name)
        if implementation is not None:
            with self:
                return implementation(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                size = tensor.untyped_storage().nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor.untyped_storage(), self._free, size)
        return out

    def _free(self, size):
        self.live -= size


def dpo_step(pipeline, hidden, weight, targets, ref, beta=0.1):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    tracker = PeakMemory()
    with tracker:
        loss = pipeline(h, w, targets, ref, beta)
        loss.backward()
    return loss.detach(), h.grad, w.grad, tracker.peak


def fused(h, w, targets, ref, beta):
    pairs = targets.shape[0] // 2
    loss, _ = prefops.PreferenceLoss("sigmoid", beta=beta)(h, w, targets, ref_chosen_logps=ref[:pairs],
                                                           ref_rejected_logps=ref[pairs:])
    return loss


def reference(h, w, targets, ref, beta):
    pairs = targets.shape[0] // 2
    sums = prefops.sequence_sum(prefops.reference.linear_logprobs(h, w, targets), targets != -100)
    losses, _ = prefops.losses.pairwise_loss(sums[:pairs], sums[pairs:], ref[:pairs], ref[pairs:], beta=beta)
    return losses.mean()


def main():
    torch.manual_seed(0)
    pairs, length, hidden_size, vocab = 4, 256, 256, 32000
    hidden = torch.randn(2 * pairs, length, hidden_size)
    weight = torch.randn(vocab, hidden_size) * 4 / hidden_size**0.5  # logits with std ~4
    targets = torch.randint(0, vocab, (2 * pairs, length))
    targets[:, : length // 10] = -100  # prompt
    targets[:, -length // 4:] = -100  # padding
    ref = torch.randn(2 * pairs) - 10 * length
    print(f"DPO sigmoid, {pairs} pairs x {length} tokens, H={hidden_size}, V={vocab}, fp32 on CPU")
    results = {name: dpo_step(fn, hidden, weight, targets, ref) for name, fn in (("fused", fused),
                                                                                   ("reference", reference))}
    (loss_f, dh_f, dw_f, peak_f), (loss_r, dh_r, dw_r, peak_r) = results["fused"], results["reference"]
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    print(f"loss      fused {loss_f.item():.6f}  reference {loss_r.item():.6f}  rel. error {rel(loss_f, loss_r):.1e}")
    print(f"grad h    rel. error {rel(dh_f, dh_r):.1e}")
    print(f"grad W    rel. error {rel(dw_f, dw_r):.1e}")
    print(f"peak memory allocated during forward+backward: fused {peak_f / 2**20:.1f} MiB, "
          f"reference {peak_r / 2**20:.1f} MiB (logits alone: {2 * pairs * length * vocab * 4 / 2**20:.0f} MiB)")
    if max(rel(dh_f, dh_r), rel(dw_f, dw_r), rel(loss_f, loss_r)) > 1e-4:
        raise SystemExit("fused and reference disagree")


if __name__ == "__main__":
    main()
