"""Random inputs and float64 references shared by the op tests."""
import torch

import prefops


def make_inputs(n_rows, hidden_size, vocab, *, dtype=torch.float32, scale=1.0, bias=False, ignore_every=4,
                seed=None, device="cpu"):
    """Fresh random hidden, weight, targets (every ignore_every-th token ignored), optional bias.

    `scale` sets the logits' standard deviation (h ~ N(0,1), W ~ N(0, scale^2 / H))."""
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    hidden = torch.randn(n_rows, hidden_size, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64) * scale / hidden_size**0.5
    targets = torch.randint(0, vocab, (n_rows,), generator=generator)
    if ignore_every:
        targets[::ignore_every] = -100
    b = torch.randn(vocab, generator=generator, dtype=torch.float64) if bias else None
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), targets.to(device), cast(b)


def run_with_grads(fn, hidden, weight, bias, targets, upstream, **kwargs):
    """Run fn (fused or reference), backprop sum(out_i * upstream_i); return outputs and grads."""
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight) + ((bias,) if bias is not None else ())]
    out = fn(leaves[0], leaves[1], targets, bias=leaves[2] if bias is not None else None, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    outs = [o for o in outs if o is not None]
    total = sum((o.double() * u).sum() for o, u in zip(outs, upstream))
    grads = torch.autograd.grad(total, leaves)
    return [o.detach() for o in outs], list(grads)


def reference64(hidden, weight, bias, targets, upstream, **kwargs):
    """The float64 reference on the same (rounded) inputs."""
    up = lambda x: None if x is None else x.double()  # noqa: E731
    return run_with_grads(prefops.reference.linear_logprobs, up(hidden), up(weight), up(bias), targets, upstream,
                          **kwargs)
