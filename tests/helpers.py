"""Random inputs and float64 references shared by the op tests, and the trainer tests' shared steps."""
import pytest
import torch


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


def transform64(linear, temperature=1.0, softcap=None):
    """z = softcap * tanh(linear / temperature / softcap), or linear / temperature (float64 in, float64 out)."""
    z = linear / temperature
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def token_values64(z, targets, ignore_index=-100):
    """From the definitions, per row of logits z [n, V]: log p(target), lse, entropy, sum p^2 and
    sum z; 0 at ignored rows."""
    counted = targets != ignore_index
    logp_all = torch.log_softmax(z, -1)
    p = logp_all.exp()
    picked = logp_all.gather(-1, torch.where(counted, targets, 0).long()[:, None]).squeeze(-1)
    values = (picked, torch.logsumexp(z, -1), -(p * logp_all).sum(-1), (p * p).sum(-1), z.sum(-1))
    return [torch.where(counted, value, 0.0) for value in values]


def kl64(za, zb):
    """KL(softmax(za) || softmax(zb)) per row."""
    la, lb = za.log_softmax(-1), zb.log_softmax(-1)
    return (la.exp() * (la - lb)).sum(-1)


def token_kl_loss(ref_z, targets, counted, policy_first, upstream, ignore_index=-100):
    """loss_of_logits (for linear_grads64) of the per-token KL: with the policy's logits z and the
    reference's ref_z, KL(p_θ || p_ref) when policy_first else KL(p_ref || p_θ), log p(target) of both
    sides, all 0 where not counted; the loss is sum(kl * upstream[0] + logp * upstream[1])."""
    def loss(z):
        za, zb = (z, ref_z) if policy_first else (ref_z, z)
        kl = torch.where(counted, kl64(za, zb), 0.0)
        logp, ref_logp = (torch.where(counted, token_values64(side, targets, ignore_index)[0], 0.0)
                          for side in (z, ref_z))
        return (kl * upstream[0]).sum() + (logp * upstream[1]).sum(), (kl, logp, ref_logp)
    return loss


def linear_grads64(hidden, weight, bias, loss_of_logits, temperature=1.0, softcap=None):
    """Float64 from the definitions on the same (rounded) inputs h [n, H], W [V, H], b [V]:
    loss_of_logits(z) -> (scalar, outputs: tensors, lists or dicts of them) on the materialised
    logits z, differentiated by autograd with respect to the linear output G = d loss / d(hW^T + b).
    Returns (outputs, [dh, dW(, db)], [their magnitudes |G||W|, |G|^T|h|(, sum |G|)], max |z|)."""
    h, w = hidden.double(), weight.double()
    linear = (h @ w.t() + (0.0 if bias is None else bias.double())).requires_grad_()
    z = transform64(linear, temperature, softcap)
    total, outputs = loss_of_logits(z)
    (g,) = torch.autograd.grad(total, linear)
    grads, sizes = [g @ w, g.t() @ h], [g.abs() @ w.abs(), g.abs().t() @ h.abs()]
    if bias is not None:
        grads.append(g.sum(0))
        sizes.append(g.abs().sum(0))
    return _detached(outputs), grads, sizes, z.detach().abs().max().item()


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return [_detached(v) for v in value]


def reference64(hidden, weight, bias, targets, upstream, *, ignore_index=-100, temperature=1.0, softcap=None,
                return_lse=False, return_entropy=False):
    """linear_logprobs from the definitions in float64 on the same (rounded) inputs: (outputs, gradients of
    sum(out_i * upstream_i), their magnitudes, max |z|), as linear_grads64."""
    flat_targets = targets.reshape(-1)

    def loss(z):
        logp, lse, entropy = token_values64(z, flat_targets, ignore_index)[:3]
        outs = [logp] + ([lse] if return_lse else []) + ([entropy] if return_entropy else [])
        outs = [o.view(targets.shape) for o in outs]
        return sum((o * u).sum() for o, u in zip(outs, upstream)), outs

    outs, grads, sizes, logit_size = linear_grads64(hidden.reshape(-1, hidden.shape[-1]), weight, bias, loss,
                                                    temperature, softcap)
    grads[0], sizes[0] = grads[0].view(hidden.shape), sizes[0].view(hidden.shape)
    return outs, grads, sizes, logit_size


def save_tiny_reward_model(path, chars, **config):
    """A character-level tokenizer and a LlamaForSequenceClassification (one label) saved to `path`, as a
    local reward-model directory; returns (model, tokenizer). config: LlamaConfig fields."""
    import tokenizers
    import transformers
    from tokenizers import Regex, models as token_models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<eos>", *chars])}
    backend = tokenizers.Tokenizer(token_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                                     eos_token="<eos>")
    shape = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        **{**shape, **config}, vocab_size=len(vocab), num_labels=1))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def nudge(model, scale=0.05, seed=1):
    """Add N(0, scale^2) noise to every parameter, so that a model just copied to its frozen reference moves off
    it and no loss sits at its symmetric point (where chosen and rejected tie and gradients can cancel).
    seed None draws from the global generator as it stands (building the model seeded it) instead."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


class Interrupted(Exception):
    """The crash interrupted_then_resumed plants."""


def interrupted_then_resumed(make_trainer, config, *, step, stage="dpo"):
    """Train make_trainer(config) until it has written the checkpoint of (stage, step) and crash there, then train
    a fresh make_trainer of the same config with resume: true to the end; returns that resumed trainer."""
    from prefops.training import checkpoint, config as C

    save = checkpoint.save

    def save_then_crash(path, **kwargs):
        save(path, **kwargs)
        if (kwargs["stage"], kwargs["step"]) == (stage, step):
            raise Interrupted(f"after writing the checkpoint of {stage} step {step}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "save", save_then_crash)
        with pytest.raises(Interrupted):
            make_trainer(config).train()
        # Still crashing there: a run that started over instead of resuming would reproduce the uninterrupted run
        # as well, but it writes that checkpoint again.
        resumed = make_trainer(C.from_dict({**C.to_dict(config), "resume": True}))
        resumed.train()
    return resumed
