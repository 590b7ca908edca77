"""Memory is a feature: record every tensor the ops allocate and check none is N x V or over budget."""
import pytest
import torch

import prefops
from prefops.memory import AllocationRecorder
from helpers import make_inputs


def record(fn):
    recorder = AllocationRecorder()
    with recorder:
        fn()
    return recorder


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_logits_sized_tensor_in_forward_or_backward(backend):
    n, hidden_size, vocab = 96, 32, 1009
    hidden, weight, targets, _ = make_inputs(n, hidden_size, vocab, ignore_every=3)
    hidden.requires_grad_()
    weight.requires_grad_()
    workspace = 64 * 1024

    def step():
        with prefops.settings(workspace=workspace, backend=backend):
            prefops.linear_logprobs(hidden, weight, targets).sum().backward()

    recorder = record(step)
    gradient_bytes = max(hidden.numel(), weight.numel()) * 4
    counted = int((targets != -100).sum())
    assert recorder.sizes, "the recorder saw nothing: the test would pass vacuously"
    biggest_bytes, biggest_numel, where = max(recorder.sizes)
    assert biggest_numel < counted * vocab, f"{where} allocated {biggest_numel} elements (N x V = {counted * vocab})"
    assert biggest_bytes <= max(gradient_bytes, workspace), f"{where} allocated {biggest_bytes} bytes"
    assert weight.grad is not None and hidden.grad is not None


def test_the_recorder_catches_the_naive_implementation():
    hidden, weight, targets, _ = make_inputs(96, 32, 1009)
    recorder = record(lambda: prefops.reference.linear_logprobs(hidden, weight, targets))
    assert max(numel for _, numel, _ in recorder.sizes) >= 96 * 1009


def test_budget_strategy_stays_within_its_budget():
    pairs, length, hidden_size, vocab = 4, 24, 32, 1009
    hidden, weight, targets, _ = make_inputs(2 * pairs * length, hidden_size, vocab, ignore_every=0)
    targets = targets.view(2 * pairs, length)
    targets[:, :4] = -100
    hidden = hidden.view(2 * pairs, length, hidden_size).requires_grad_()
    weight.requires_grad_()
    groups = torch.stack([torch.arange(pairs), torch.arange(pairs) + pairs], 1)
    budget = 2 * 20 * vocab * 4  # one pair's logits in fp32

    def head(logps, group_index, stats):
        return -torch.nn.functional.logsigmoid(0.1 * (logps[:, 0] - logps[:, 1])).sum()

    def step():
        out = prefops.sequence_objective(hidden, weight, targets, head=head, groups=groups, strategy="budget",
                                         budget=budget)
        out.loss.backward()

    recorder = record(step)
    biggest_bytes, biggest_numel, where = max(recorder.sizes)
    assert biggest_bytes <= max(budget, weight.numel() * 4, hidden.numel() * 4), where
    assert biggest_numel < 2 * pairs * 20 * vocab


@pytest.mark.parametrize("n,vocab,hidden,workspace", [
    (5325, 128256, 4096, 160 << 20),   # shape A's counted rows at the default workspace
    (21299, 128256, 4096, 160 << 20),  # shape L
    (5325, 152064, 3584, 64 << 20),
    (40, 1013, 67, 1 << 16),           # a tiny workspace: 16-column tiles
])
def test_gradient_tiles_fit_the_workspace_and_keep_16_byte_rows(n, vocab, hidden, workspace):
    """Each side of the backward plan stays within half the workspace, and a tile narrower than
    the vocabulary has a row stride the gradient kernel can store 16 bytes at a time."""
    from prefops.fused import plan_chunks

    row_chunk, v_chunk = plan_chunks(n, vocab, hidden, 2, workspace)
    assert row_chunk * hidden * 12 <= workspace // 2 or row_chunk == 16
    assert row_chunk * v_chunk * 2 <= workspace // 2
    if v_chunk < vocab:
        assert v_chunk % (256 if v_chunk >= 256 else 16) == 0
