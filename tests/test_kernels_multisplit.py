"""Every Triton kernel, called through its launcher, against float64 computed here from the
definitions (materialised logits, log_softmax, gather, autograd; no prefops.tiles or
prefops.reference), at shapes that reach the code a GPU runs at V = 128k: several vocabulary
splits (forced with prefops.kernels.config.forced), splits and vocabulary ranges that are no
multiple of a block, several row blocks with a partial last one, hidden sizes that are no
multiple of BLOCK_K, logits of size 1e2..1e3, bias, softcap and temperature; the lean op with
several row chunks and vocabulary tiles. Under TRITON_INTERPRET=1 the tiled kernels run one
16 x 32 x 16 tile config (kernels/config.py), so these small shapes span several tiles."""
import pytest
import torch
import triton

import prefops
import prefops.kernels.logits_grad
from conftest import grad_tolerance, relative_error, value_tolerance
from helpers import (kl64, linear_grads64, make_inputs, reference64, run_with_grads, token_kl_loss, token_values64,
                     transform64)
from prefops.kernels import config
from prefops.kernels.logits_grad import launch_logits_grad
from prefops.kernels.logits_stats import launch_logits_stats
from prefops.kernels.rows_grad import launch_rows_grad
from prefops.kernels.rows_kl import launch_rows_kl_grad, launch_rows_kl_stats
from prefops.kernels.rows_stats import launch_rows_stats
from prefops.kernels.token_kl_grad import launch_token_kl_grad
from prefops.kernels.token_kl_stats import launch_token_kl_stats
from prefops.token_kl import linear_token_kl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# 50 tokens, every 4th ignored: 37 counted rows gathered through an index vector (two full row
# blocks of 16 and a partial one); H and H_ref no multiple of 16; V no multiple of 32.
TOKENS, HIDDEN, REF_HIDDEN, VOCAB = 50, 37, 21, 300
COUNTED = TOKENS - len(range(0, TOKENS, 4))
V_PER_SPLIT = 88  # 4 splits (88, 88, 88, 36): each ends in a partial block, each starts off a block boundary
SPLITS = 4
ROW_BLOCK = 64  # the row kernels' vocabulary block: 5 blocks over V, the last one partial
CHUNK, V_BEGIN, V_COUNT = slice(5, 34), 40, 203  # a gradient tile: rows and columns off every block boundary
TRANSFORM = {"temperature": 0.7, "softcap": 30.0}
# (dtype, logit scale, bias and transform): fp32; bf16 and fp16 with everything on; logits ~1e3.
CASES = [(torch.float32, 4.0, False, {}), (torch.bfloat16, 4.0, True, TRANSFORM),
         (torch.float16, 4.0, True, TRANSFORM), (torch.float32, 300.0, True, {"temperature": 0.9})]
CASE_IDS = ["fp32", "bf16-bias-softcap-temperature", "fp16-bias-softcap-temperature", "fp32-logits-1e3"]


def counted(seed, dtype=torch.float32, scale=4.0, bias=False, hidden_size=HIDDEN):
    """h, W, b on DEVICE, the counted rows and their int32 targets."""
    hidden, weight, targets, b = make_inputs(TOKENS, hidden_size, VOCAB, dtype=dtype, scale=scale, bias=bias,
                                             seed=seed, device=DEVICE)
    rows = (targets != -100).nonzero().squeeze(1)
    assert rows.numel() == COUNTED
    return hidden, weight, b, rows, targets[rows].to(torch.int32)


def logits64(hidden, weight, bias, rows, temperature=1.0, softcap=None):
    """z of the counted rows in float64 from the same rounded h, W, b, and the linear output it came from."""
    linear = hidden[rows].double() @ weight.double().t() + (0.0 if bias is None else bias.double())
    return transform64(linear, temperature, softcap), linear


def split_values64(z, targets, width):
    """Per split of `width` columns, from the definitions: max, lse, entropy, sum p^2, the target's
    logit (0 outside the split), sum z and sum |z|, each [n, splits]."""
    columns = []
    for v0 in range(0, z.shape[1], width):
        part = z[:, v0:v0 + width]
        logp = part.log_softmax(1)
        p = logp.exp()
        inside = (targets >= v0) & (targets < v0 + part.shape[1])
        target = torch.where(inside, z.gather(1, targets.clamp_min(0).long()[:, None]).squeeze(1), 0.0)
        columns.append((part.max(1).values, part.logsumexp(1), -(p * logp).sum(1), (p * p).sum(1), target,
                        part.sum(1), part.abs().sum(1)))
    return [torch.stack(column, 1) for column in zip(*columns)]


def row_size(*logits, like=None):
    """max |z| of each row (of either side), shaped like `like`: the scale of a value near 0 (an
    entropy, a KL) whose error is the logits' absolute one."""
    size = torch.stack([z.abs().amax(1) for z in logits]).amax(0)
    return size if like is None else size[:, None].expand_as(like)


class Recorder:
    """Stands in for a kernel: records (name, grid, BLOCK_V) of each launch, then launches."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, grid, kwargs["BLOCK_V"]))
            return self.kernel[grid](*args, **kwargs)
        return launch

    @property
    def fn(self):
        """An autotuned kernel's launcher passes its own block through the JIT function."""
        return Recorder(self.name, self.kernel.fn, self.launches)


def test_forcing_takes_effect(monkeypatch):
    hidden, weight, _, rows, targets = counted(0)
    assert launch_logits_stats(hidden, weight, None, rows, targets, 1.0, None).max.shape == (COUNTED, 1)
    with config.forced(v_per_split=V_PER_SPLIT):
        assert launch_logits_stats(hidden, weight, None, rows, targets, 1.0, None).max.shape == (COUNTED, SPLITS)
        assert launch_token_kl_stats(hidden, weight, None, hidden, weight, None, rows, targets, 1.0,
                                     None).a_max.shape == (COUNTED, SPLITS)
    with config.forced(splits=7):
        assert config.vocabulary_splits(COUNTED, VOCAB, torch.device(DEVICE)) == (7, 43)
    assert config.vocabulary_splits(COUNTED, VOCAB, torch.device(DEVICE))[0] == 1
    # The row kernels: record the grid and block of each launch.
    launches = []
    for launcher, name in ((launch_rows_stats, "rows_stats_kernel"), (launch_rows_grad, "rows_grad_kernel"),
                           (launch_rows_kl_stats, "rows_kl_stats_kernel"),
                           (launch_rows_kl_grad, "rows_kl_grad_kernel")):
        monkeypatch.setitem(launcher.__globals__, name, Recorder(name, launcher.__globals__[name], launches))
    logits, zeros = torch.randn(3, VOCAB, device=DEVICE), torch.zeros(3, device=DEVICE)
    row_targets = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    with config.forced(block=ROW_BLOCK):
        launch_rows_stats(logits, row_targets, 1.0, None)
        launch_rows_grad(logits, torch.empty_like(logits), row_targets, zeros, zeros, zeros, 1.0, None)
        launch_rows_kl_stats(logits, logits, row_targets, True, 1.0, None)
        launch_rows_kl_grad(logits, logits, torch.empty_like(logits), row_targets, zeros, zeros, zeros, zeros,
                            zeros, True, 1.0, None)
    blocks = triton.cdiv(VOCAB, ROW_BLOCK)
    assert launches == [("rows_stats_kernel", (3,), ROW_BLOCK), ("rows_grad_kernel", (3, blocks), ROW_BLOCK),
                        ("rows_kl_stats_kernel", (3,), ROW_BLOCK), ("rows_kl_grad_kernel", (3, blocks), ROW_BLOCK)]
    launches.clear()
    launch_rows_stats(logits, row_targets, 1.0, None)
    assert launches == [("rows_stats_kernel", (3,), 512)]


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU autotunes among larger tiles")
def test_shapes_span_several_tiles_of_the_interpreter_config():
    for configs in (config.stats_configs(), config.grad_configs(), config.pair_configs()):
        (only,) = configs
        block_n, block_v, block_k = only.kwargs["BLOCK_N"], only.kwargs["BLOCK_V"], only.kwargs["BLOCK_K"]
        assert COUNTED > 2 * block_n and COUNTED % block_n, "several row blocks, a partial last one"
        assert HIDDEN > block_k and HIDDEN % block_k and REF_HIDDEN % block_k, "partial last hidden block"
        assert V_PER_SPLIT > block_v and V_PER_SPLIT % block_v and VOCAB % V_PER_SPLIT, "partial blocks and split"
        assert V_COUNT % block_v and V_BEGIN % block_v and CHUNK.start % block_n, "tiles off block boundaries"


@pytest.mark.parametrize("dtype,scale,bias,transform", CASES, ids=CASE_IDS)
def test_logits_stats_kernel_per_split(dtype, scale, bias, transform):
    hidden, weight, b, rows, targets = counted(1, dtype, scale, bias)
    temperature, softcap = transform.get("temperature", 1.0), transform.get("softcap")
    with config.forced(v_per_split=V_PER_SPLIT):
        m, s, a, q, t, u = (x.double() for x in launch_logits_stats(hidden, weight, b, rows, targets, temperature,
                                                                     softcap))
    z, _ = logits64(hidden, weight, b, rows, temperature, softcap)
    want_max, want_lse, want_entropy, want_p2, want_target, want_sum, abs_sum = split_values64(z, targets,
                                                                                               V_PER_SPLIT)
    assert m.shape == (rows.numel(), SPLITS)
    values, size = value_tolerance(HIDDEN, VOCAB), row_size(z, like=m)
    assert relative_error(m, want_max) <= values, "max"
    assert relative_error(m + s.log(), want_lse) <= values, "lse"
    assert relative_error(s.log() - a / s, want_entropy, scale=size) <= values, "entropy"
    assert relative_error(q / s**2, want_p2, scale=size) <= values, "sum p^2"
    assert relative_error(t, want_target) <= values and torch.equal(t == 0, want_target == 0), "target logit"
    assert relative_error(u, want_sum, scale=abs_sum) <= values, "logit sum"


@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 4.0), (torch.float32, 300.0)], ids=["bf16", "fp32-1e3"])
def test_logits_stats_kernel_top_k_per_split(dtype, scale):
    # Splits of 74 columns: the fifth holds 4, fewer than k, so a slot stays empty (-1e38, id -1).
    k, width = 5, 74
    hidden, weight, b, rows, targets = counted(2, dtype, scale, bias=True)
    with config.forced(v_per_split=width):
        _, values, ids = launch_logits_stats(hidden, weight, b, rows, targets, 0.8, None, top_k=k)
    z, _ = logits64(hidden, weight, b, rows, temperature=0.8)
    assert values.shape == ids.shape == (rows.numel(), 5, k)
    tolerance = value_tolerance(HIDDEN, VOCAB)
    for split, v0 in enumerate(range(0, VOCAB, width)):
        part = z[:, v0:v0 + width]
        filled = min(k, part.shape[1])
        got, order = values[:, split].double().sort(1, descending=True)
        got_ids = ids[:, split].long().gather(1, order)
        assert relative_error(got[:, :filled], part.topk(filled, 1).values) <= tolerance, split
        # Each id holds the value reported for it: the right ids up to exact ties.
        assert ((got_ids[:, :filled] >= v0) & (got_ids[:, :filled] < v0 + part.shape[1])).all(), split
        assert relative_error(got[:, :filled], z.gather(1, got_ids[:, :filled])) <= tolerance, split
        assert all(len(set(row.tolist())) == filled for row in got_ids[:, :filled])
        assert (got[:, filled:].float() == -1e38).all() and (got_ids[:, filled:] == -1).all(), split


@pytest.mark.parametrize("dtype,scale,bias,transform,out_dtype",
                         [case[:4] + (case[0],) for case in CASES] + [CASES[1][:4] + (torch.float32,)],
                         ids=CASE_IDS + ["bf16-fp32-tile"])
def test_logits_grad_kernel_on_an_offset_tile(dtype, scale, bias, transform, out_dtype):
    hidden, weight, b, rows, targets = counted(3, dtype, scale, bias)
    temperature, softcap = transform.get("temperature", 1.0), transform.get("softcap")
    g = torch.Generator().manual_seed(3)
    upstream = [torch.randn(rows.numel(), generator=g, dtype=torch.float64).to(DEVICE) for _ in range(3)]
    z, linear = logits64(hidden, weight, b, rows, temperature, softcap)
    logp, lse, entropy = token_values64(transform64(linear.requires_grad_(), temperature, softcap), targets)[:3]
    (want,) = torch.autograd.grad(sum((value * u).sum() for value, u in zip((logp, lse, entropy), upstream)), linear)
    per_row = [x.detach().float() for x in (lse, entropy, *upstream)]
    out = torch.empty(CHUNK.stop - CHUNK.start, V_COUNT, dtype=out_dtype, device=DEVICE)
    launch_logits_grad(hidden, weight, b, rows[CHUNK], targets[CHUNK], *(x[CHUNK] for x in per_row), temperature,
                       softcap, V_BEGIN, out)
    want = want[CHUNK, V_BEGIN:V_BEGIN + V_COUNT]
    assert relative_error(out, want) <= grad_tolerance(out_dtype, HIDDEN, VOCAB, 1, z.abs().max().item())


def row_logits(seed):
    """Materialised fp32 logits [7, V]: scale 4, one row shifted by -1e3 and one scaled to ~1e2
    (the shifted statistics must not cancel), and int32 targets."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(7, VOCAB, generator=g, dtype=torch.float64) * 4
    logits[0] -= 1e3
    logits[1] *= 50
    return logits.to(device=DEVICE, dtype=torch.float32), torch.randint(0, VOCAB, (7,), generator=g).to(DEVICE, torch.int32)


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_rows_stats_kernel_over_several_blocks(softcap):
    logits, targets = row_logits(seed=4)
    with config.forced(block=ROW_BLOCK):
        m, s, a, q, t, u = (x.double() for x in launch_rows_stats(logits, targets, 0.9, softcap))
    z = transform64(logits.double(), 0.9, softcap)
    logp, lse, entropy, sum_p2, logit_sum = token_values64(z, targets)
    values, size = value_tolerance(VOCAB), row_size(z)
    assert relative_error(m + s.log(), lse) <= values, "lse"
    assert relative_error(t - m - s.log(), logp) <= values, "log p"
    assert relative_error(s.log() - a / s, entropy, scale=size) <= values, "entropy"
    assert relative_error(q / s**2, sum_p2, scale=size) <= values, "sum p^2"
    assert relative_error(u, logit_sum, scale=z.abs().sum(1)) <= values, "logit sum"


@pytest.mark.parametrize("softcap,out_dtype", [(None, torch.float32), (20.0, torch.bfloat16)])
def test_rows_grad_kernel_over_several_blocks(softcap, out_dtype):
    logits, targets = row_logits(seed=5)
    g = torch.Generator().manual_seed(5)
    grad_logp, grad_lse = (torch.randn(7, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    linear = logits.double().requires_grad_()
    z = transform64(linear, 0.9, softcap)
    logp, lse = token_values64(z, targets)[:2]
    (want,) = torch.autograd.grad((grad_logp * logp + grad_lse * lse).sum(), linear)
    out = torch.empty(logits.shape, dtype=out_dtype, device=DEVICE)
    with config.forced(block=ROW_BLOCK):
        launch_rows_grad(logits, out, targets, lse.detach().float(), grad_logp.float(), grad_lse.float(), 0.9, softcap)
    logit_size = z.abs().max().item()
    assert relative_error(out, want) <= grad_tolerance(out_dtype, 1, VOCAB, 1, logit_size)


@pytest.mark.parametrize("policy_first", [True, False])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_rows_kl_kernels_over_several_blocks(policy_first, softcap):
    logits, targets = row_logits(seed=6)
    ref_logits, _ = row_logits(seed=7)
    targets[2] = -1  # no target: its log-probs are 0 and take no gradient (the kernels' contract)
    g = torch.Generator().manual_seed(6)
    grad_kl, grad_logp = (torch.randn(7, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    grad_logp[2] = 0
    with config.forced(block=ROW_BLOCK):
        m_a, s_a, m_b, s_b, c, t_a, t_b = (x.double() for x in launch_rows_kl_stats(
            logits, ref_logits, targets, policy_first, 0.9, softcap))
    linear = logits.double().requires_grad_()
    z, y = transform64(linear, 0.9, softcap), transform64(ref_logits.double(), 0.9, softcap)
    za, zb = (z, y) if policy_first else (y, z)
    kl, lse_a, lse_b = kl64(za, zb), za.logsumexp(1), zb.logsumexp(1)
    logp_a, logp_b = (token_values64(side, targets, ignore_index=-1)[0] for side in (za, zb))
    values = value_tolerance(VOCAB)
    logit_size = max(z.abs().max().item(), y.abs().max().item())
    assert relative_error(c / s_a + s_b.log() - s_a.log(), kl, scale=row_size(z, y)) <= values, "KL"
    assert relative_error(m_a + s_a.log(), lse_a) <= values and relative_error(m_b + s_b.log(), lse_b) <= values
    has_target = targets >= 0
    assert relative_error(torch.where(has_target, t_a - m_a - s_a.log(), 0.0), logp_a) <= values, "log p_a"
    assert relative_error(torch.where(has_target, t_b - m_b - s_b.log(), 0.0), logp_b) <= values, "log p_b"
    assert (t_a[~has_target] == 0).all() and (t_b[~has_target] == 0).all()

    logp = logp_a if policy_first else logp_b
    (want,) = torch.autograd.grad((grad_kl * kl + grad_logp * logp).sum(), linear)
    lse, ref_lse = (lse_a, lse_b) if policy_first else (lse_b, lse_a)
    per_row = [x.detach().float() for x in (lse, ref_lse, kl, grad_kl, grad_logp)]
    out = torch.empty_like(logits)
    with config.forced(block=ROW_BLOCK):
        launch_rows_kl_grad(logits, ref_logits, out, targets, *per_row, policy_first, 0.9, softcap)
    assert relative_error(out, want) <= grad_tolerance(torch.float32, 1, VOCAB, 1, logit_size)


def kl_sides(seed, dtype, scale, bias):
    hidden, weight, b, rows, targets = counted(seed, dtype, scale, bias)
    ref_hidden, ref_weight, ref_b, _, _ = counted(seed + 100, dtype, scale, bias, hidden_size=REF_HIDDEN)
    targets[::5] = -1  # rows without a target: their log-probs are 0
    return (hidden, weight, b), (ref_hidden, ref_weight, ref_b), rows, targets


KL_CASES = [(torch.bfloat16, 4.0, True, TRANSFORM, True), (torch.float32, 4.0, False, {}, False),
            (torch.float32, 200.0, True, {"temperature": 0.9}, True)]
KL_IDS = ["bf16-bias-softcap-temperature-policy-first", "fp32-ref-first", "fp32-logits-1e2-policy-first"]


@pytest.mark.parametrize("dtype,scale,bias,transform,policy_first", KL_CASES, ids=KL_IDS)
def test_token_kl_stats_kernel_per_split(dtype, scale, bias, transform, policy_first):
    policy, reference, rows, targets = kl_sides(8, dtype, scale, bias)
    temperature, softcap = transform.get("temperature", 1.0), transform.get("softcap")
    first, second = (policy, reference) if policy_first else (reference, policy)
    with config.forced(v_per_split=V_PER_SPLIT):
        m_a, s_a, m_b, s_b, c, t_a, t_b = (x.double() for x in launch_token_kl_stats(
            *first, *second, rows, targets, temperature, softcap))
    assert m_a.shape == (rows.numel(), SPLITS)
    za, zb = (logits64(*side, rows, temperature, softcap)[0] for side in (first, second))
    values, size = value_tolerance(HIDDEN, VOCAB), row_size(za, zb)
    for split, v0 in enumerate(range(0, VOCAB, V_PER_SPLIT)):
        part_a, part_b = za[:, v0:v0 + V_PER_SPLIT], zb[:, v0:v0 + V_PER_SPLIT]
        at = slice(split, split + 1)
        assert relative_error(m_a[:, at] + s_a[:, at].log(), part_a.logsumexp(1, keepdim=True)) <= values, split
        assert relative_error(m_b[:, at] + s_b[:, at].log(), part_b.logsumexp(1, keepdim=True)) <= values, split
        kl = c[:, split] / s_a[:, split] + s_b[:, split].log() - s_a[:, split].log()
        assert relative_error(kl, kl64(part_a, part_b), scale=size) <= values, split
    for got, z in ((t_a, za), (t_b, zb)):
        want = split_values64(z, targets, V_PER_SPLIT)[4]
        assert relative_error(got, want) <= values and torch.equal(got == 0, want == 0)


@pytest.mark.parametrize("dtype,scale,bias,transform,policy_first", KL_CASES, ids=KL_IDS)
def test_token_kl_grad_kernel_on_an_offset_tile(dtype, scale, bias, transform, policy_first):
    policy, reference, rows, targets = kl_sides(9, dtype, scale, bias)
    temperature, softcap = transform.get("temperature", 1.0), transform.get("softcap")
    g = torch.Generator().manual_seed(9)
    grad_kl, grad_logp = (torch.randn(rows.numel(), generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    grad_logp = torch.where(targets >= 0, grad_logp, 0.0)  # no target, no log-prob gradient (the kernel's contract)
    z, linear = logits64(*policy, rows, temperature, softcap)
    y, _ = logits64(*reference, rows, temperature, softcap)
    linear.requires_grad_()
    every_row = torch.ones_like(targets, dtype=torch.bool)
    loss = token_kl_loss(y, targets, every_row, policy_first, (grad_kl, grad_logp), ignore_index=-1)
    total, (kl, _, _) = loss(transform64(linear, temperature, softcap))
    (want,) = torch.autograd.grad(total, linear)
    per_row = [x.detach().float() for x in (z.logsumexp(1), y.logsumexp(1), kl, grad_kl, grad_logp)]
    out = torch.empty(CHUNK.stop - CHUNK.start, V_COUNT, dtype=dtype, device=DEVICE)
    launch_token_kl_grad(*policy, *reference, rows[CHUNK], targets[CHUNK], *(x[CHUNK] for x in per_row),
                         policy_first, temperature, softcap, V_BEGIN, out)
    logit_size = max(z.abs().max().item(), y.abs().max().item())
    want = want[CHUNK, V_BEGIN:V_BEGIN + V_COUNT]
    assert relative_error(out, want) <= grad_tolerance(dtype, HIDDEN, VOCAB, 1, logit_size)


def count_calls(monkeypatch, module, name):
    """Wrap the launcher `name` in `module` (the ops import it when they run); returns the v_begin of its calls."""
    calls, real = [], getattr(module, name)

    def wrapper(*args):
        calls.append(args[-2])
        return real(*args)
    monkeypatch.setattr(module, name, wrapper)
    return calls


# fused.plan_chunks at this workspace: chunks of 16 rows (3 for the 37 counted rows) and
# tiles of 48 (fp32) or 96 (bf16) columns.
WORKSPACE = 6400


def check_chunks(v_begins):
    tiles = len(set(v_begins))
    assert tiles >= 3 and len(v_begins) == 3 * tiles, f"3 row chunks x several vocabulary tiles: {v_begins}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_op_with_splits_row_chunks_and_tiles(dtype, monkeypatch):
    hidden, weight, targets, bias = make_inputs(TOKENS, HIDDEN, VOCAB, dtype=dtype, scale=4.0, bias=True, seed=10,
                                                device=DEVICE)
    options = dict(return_lse=True, return_entropy=True, **TRANSFORM)
    upstream = [torch.randn(targets.shape, dtype=torch.float64, device=DEVICE) for _ in range(3)]
    calls = count_calls(monkeypatch, prefops.kernels.logits_grad, "launch_logits_grad")
    fused = lambda *a, **k: prefops.linear_logprobs(*a, backend="triton", **k)  # noqa: E731
    with config.forced(v_per_split=V_PER_SPLIT), prefops.settings(workspace=WORKSPACE, strategy="lean"):
        actual, actual_grads = run_with_grads(fused, hidden, weight, bias, targets, upstream, **options)
    check_chunks(calls)
    expected, expected_grads, sizes, logit_size = reference64(hidden, weight, bias, targets, upstream, **options)
    for name, a, e in zip(("logp", "lse", "entropy"), actual, expected):
        assert relative_error(a, e) <= value_tolerance(HIDDEN, VOCAB), name
    limit = grad_tolerance(dtype, HIDDEN, VOCAB, TOKENS, logit_size)
    for name, a, e, size in zip(("hidden", "weight", "bias"), actual_grads, expected_grads, sizes):
        assert relative_error(a, e, scale=size) <= limit, name


@pytest.mark.parametrize("direction", ["policy_ref", "ref_policy"])
def test_lean_token_kl_with_splits_row_chunks_and_tiles(direction, monkeypatch):
    dtype = torch.bfloat16
    hidden, weight, targets, bias = make_inputs(TOKENS, HIDDEN, VOCAB, dtype=dtype, scale=4.0, bias=True, seed=11,
                                                device=DEVICE)
    ref_hidden, ref_weight, _, ref_bias = make_inputs(TOKENS, REF_HIDDEN, VOCAB, dtype=dtype, scale=4.0, bias=True,
                                                      seed=12, device=DEVICE)
    calls = count_calls(monkeypatch, prefops.kernels.token_kl_grad, "launch_token_kl_grad")
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    g = torch.Generator().manual_seed(11)
    grad_kl, grad_logp = (torch.randn(TOKENS, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    with config.forced(v_per_split=V_PER_SPLIT), prefops.settings(workspace=WORKSPACE, strategy="lean"):
        kl, logp, ref_logp = linear_token_kl(leaves[0], leaves[1], ref_hidden, ref_weight, bias=leaves[2],
                                             ref_bias=ref_bias, targets=targets, direction=direction,
                                             backend="triton", **TRANSFORM)
        ((kl.double() * grad_kl).sum() + (logp.double() * grad_logp).sum()).backward()
    check_chunks(calls)

    y = logits64(ref_hidden, ref_weight, ref_bias, torch.arange(TOKENS, device=DEVICE), **TRANSFORM)[0]
    has_target = targets != -100  # the KL of a token without one is 0 (and takes no gradient)
    loss = token_kl_loss(y, targets, has_target, direction == "policy_ref", (grad_kl, grad_logp))
    expected, want_grads, sizes, logit_size = linear_grads64(hidden, weight, bias, loss, **TRANSFORM)
    for name, a, e in zip(("kl", "log p", "ref log p"), (kl, logp, ref_logp), expected):
        assert relative_error(a, e) <= value_tolerance(HIDDEN, VOCAB), name
    limit = grad_tolerance(dtype, HIDDEN, VOCAB, TOKENS, logit_size)
    for name, leaf, e, size in zip(("hidden", "weight", "bias"), leaves, want_grads, sizes):
        assert relative_error(leaf.grad, e, scale=size) <= limit, name
