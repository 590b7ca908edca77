"""The CPU demo: a DPO loss with the fused op against the materialised-logits reference.

Prints the agreement of loss and gradients and the peak memory each path allocated
(recorded tensor by tensor), for a small Llama-like head: 4 pairs x 256 tokens, H 256, V 32000.
"""
import torch

import prefops
from prefops.memory import AllocationRecorder


def dpo_step(pipeline, hidden, weight, targets, ref, beta=0.1):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    tracker = AllocationRecorder()
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
