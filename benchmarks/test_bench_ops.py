"""pytest-benchmark suite: DPO forward+backward and the forward-only log-probs, per row of prefops.tools.bench.

    pytest benchmarks/ --benchmark-only            # add --benchmark-json=out.json to keep the numbers

Without CUDA: small odd fp32 shapes, one round a row, and every benchmarked
result is checked against the float64 reference (1e-5): the suite is then a
test of the rows it would time, and CI runs it (pytest's testpaths include
benchmarks/; about 10 s on 2 cores).
With CUDA: a real shape (4 pairs x 1024 tokens, H 4096, V 128256, bf16), the
peers included when installed; prefops rows are checked against the fp32
reference at bf16 tolerance, the others are only timed (their bf16 logits
alone are off by ~1e-2; the errors are in `prefops bench`'s table).
"""
import pytest
import torch

from prefops.tools.bench import (
    BENCH_ROWS, IGNORE_INDEX, Shape, forward_ops, make_problem, naive_token_logps, reference_outputs,
    relative_error, row_problem, row_step,
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    SHAPE, DTYPE, EXACT, TOLERANCE = Shape(pairs=4, tokens=1024, hidden=4096, vocab=128256), torch.bfloat16, \
        torch.float32, 1e-2
    KEYS = list(BENCH_ROWS)
else:
    SHAPE, DTYPE, EXACT, TOLERANCE = Shape(pairs=2, tokens=48, hidden=67, vocab=1031), torch.float32, \
        torch.float64, 1e-5
    KEYS = ["naive", "default", "lean", "budget"]  # compiling on a 2-core CPU takes longer than the rest together
CHECKED = {"default", "lean", "budget"} | (set() if CUDA else {"naive"})
# Timings of toy shapes on a shared CPU measure nothing: one round a row.
pytestmark = [] if CUDA else [pytest.mark.benchmark(min_rounds=1, max_time=0.0, warmup=False)]
PEER_MODULES = {"liger": "liger_kernel", "cce": "cut_cross_entropy", "trl": "trl"}


def synchronize():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("key", KEYS)
def test_dpo_forward_backward(benchmark, key):
    if key in PEER_MODULES:
        pytest.importorskip(PEER_MODULES[key])
    row = BENCH_ROWS[key]
    problem = row_problem(row, make_problem(SHAPE, DEVICE, dtype=DTYPE))
    expected = reference_outputs(problem, EXACT)
    step = row_step(row, problem)

    def run():
        problem.clear_gradients()
        loss = step()
        synchronize()
        return loss

    loss = benchmark(run)
    errors = [relative_error(actual, want) for actual, want in
              zip((loss, problem.hidden.grad, problem.weight.grad), expected)]
    benchmark.extra_info.update(zip(("loss_rel_err", "dh_rel_err", "dW_rel_err"), errors))
    if key in CHECKED:
        assert max(errors) <= TOLERANCE, errors


@pytest.mark.parametrize("label", ["naive forward (logps)", "prefops forward (linear_logprobs, no_grad)"])
def test_forward_logps(benchmark, label):
    problem = make_problem(SHAPE, DEVICE, dtype=DTYPE)
    op = torch.no_grad()(forward_ops(problem)[label])

    def run():
        out = op()
        synchronize()
        return out

    logp = benchmark(run)
    flat_targets = problem.targets.view(-1)
    expected = torch.cat([naive_token_logps(chunk.to(EXACT), problem.weight.detach().to(EXACT), targets)
                          for chunk, targets in zip(problem.hidden.detach().view(-1, SHAPE.hidden).split(2048),
                                                    flat_targets.split(2048))])
    assert (logp[flat_targets == IGNORE_INDEX] == 0).all()
    error = relative_error(logp, expected)
    benchmark.extra_info["rel_err"] = error
    if label.startswith("prefops") or not CUDA:
        assert error <= TOLERANCE
