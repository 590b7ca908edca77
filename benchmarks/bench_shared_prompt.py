"""Shared-prompt packing benchmark: one training step (forward + backward) shared vs unshared.

    python benchmarks/bench_shared_prompt.py --out shared.md          # one GPU: Llama-3.2-1B shape, random init
    python benchmarks/bench_shared_prompt.py --device cpu --tiny      # smoke test of the script's logic

Each example is a prompt of --prompt tokens and K responses of --response
tokens (K from --ks). The unshared layout runs K rows [prompt, response] per
example (SDPA, no padding, so its fast causal kernel); the shared layout runs
one row [prompt, response_1, ..., response_K] per example with the
shared-prompt mask (FlexAttention BlockMask, or SDPA with the dense mask).
The loss is the same in every row: sigmoid DPO (beta 0.1) of the first
response against each other one, fused from hidden states with
prefops.sequence_objective (for K = 2, exactly PreferenceLoss("sigmoid")).
A step is: decoder body, gather / no gather, fused loss, backward into every
parameter. Loss and gradients of each row are compared with the unshared row,
so a fast but wrong layout shows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

import prefops
from common import (GIB, add_timing_options, attempt, environment_line, finish_report, markdown_table, median_ms,
                    peak_during, relative_error, require_device, timing_defaults)
from prefops.losses import pairwise_loss
from prefops.shared_prompt import build_layout, shared_prompt_hidden_states

BETA = 0.1
REPS = (10, 2)  # --reps defaults on CUDA and on CPU
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True,
                rope_theta=500000.0)
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, tie_word_embeddings=True)
# Reference log-probs are the policy's own plus this much noise, so the sigmoid is not saturated.
REFERENCE_NOISE = 10.0
ROWS = (("unshared", "sdpa"), ("shared", "flex_attention"), ("shared", "sdpa"))
HEADERS = ["K", "layout", "attention", "tokens", "padded tokens", "step ms", "speed-up", "peak GB",
           "loss err", "grad err"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, help="examples per batch (default 2; 2 with --tiny)")
    parser.add_argument("--prompt", type=int, help="prompt tokens (default 2048; 96 with --tiny)")
    parser.add_argument("--response", type=int, help="tokens per response (default 256; 16 with --tiny)")
    parser.add_argument("--ks", default="2,4", help="comma-separated responses per prompt")
    parser.add_argument("--layers", type=int, help="decoder layers (default 16, the whole 1B model)")
    parser.add_argument("--rows", help="comma-separated layout:attention rows, the first is the baseline (default "
                        + ",".join(f"{a}:{b}" for a, b in ROWS) + "; on CPU without flex_attention, "
                        "which has no backward there)")
    add_timing_options(parser, "tiny model and lengths, to smoke-test the script", reps=REPS)
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    timing_defaults(args, reps=REPS)
    cuda = args.device == "cuda"
    defaults = dict(examples=2, prompt=96 if args.tiny else 2048, response=16 if args.tiny else 256)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.ks = [int(k) for k in args.ks.split(",")]
    rows = ROWS if cuda else [row for row in ROWS if row[1] != "flex_attention"]
    args.rows = rows if args.rows is None else [tuple(row.split(":")) for row in args.rows.split(",")]
    for row in args.rows:
        if len(row) != 2 or row[0] not in ("shared", "unshared") or row[1] not in ("sdpa", "eager", "flex_attention"):
            parser.error(f"--rows entries are layout:attention with layout shared or unshared and attention "
                         f"sdpa, eager or flex_attention; got {':'.join(row)!r}")
    return args


def build_model(args, device):
    config = transformers.LlamaConfig(**(TINY if args.tiny else LLAMA_1B))
    if args.layers:
        config.num_hidden_layers = args.layers
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)


def make_layout(args, k, vocab, device):
    generator = torch.Generator().manual_seed(k)
    ids = lambda n: torch.randint(0, vocab, (n,), generator=generator)  # noqa: E731
    prompts = [ids(args.prompt) for _ in range(args.examples)]
    responses = [[ids(args.response) for _ in range(k)] for _ in range(args.examples)]
    return build_layout(prompts, responses, pad_to_multiple=128 if device.type == "cuda" else 1, device=device)


def best_vs_rest(layout):
    """[E * (K - 1), 2] pairs (first response, another response) of every example."""
    return torch.cat([layout.groups[:, [0, k]] for k in range(1, layout.groups.shape[1])])


class Step:
    """One forward + backward of the DPO loss in a given layout and attention implementation."""

    def __init__(self, model, layout, layout_name, implementation, ref):
        self.model, self.layout, self.shared = model, layout, layout_name == "shared"
        self.implementation, self.ref = implementation, ref
        self.groups = best_vs_rest(layout)
        self.batch = None if self.shared else layout.unshared()

    def head(self, logps, group_index, stats):
        pairs = self.groups[group_index]
        losses, _ = pairwise_loss(logps[:, 0], logps[:, 1], self.ref[pairs[:, 0]], self.ref[pairs[:, 1]],
                                  loss_type="sigmoid", beta=BETA)
        return losses.sum() / self.groups.shape[0]

    def hidden_targets(self):
        self.model.set_attn_implementation(self.implementation)
        if self.shared:
            hidden = shared_prompt_hidden_states(self.model, self.layout)
            return self.layout.gather(hidden), self.layout.targets, self.layout.seq_ids
        body = self.model.get_decoder()
        hidden = body(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask,
                      use_cache=False).last_hidden_state
        return hidden, self.batch.targets, None

    def __call__(self):
        hidden, targets, seq_ids = self.hidden_targets()
        out = prefops.sequence_objective(hidden, self.model.lm_head.weight, targets, head=self.head,
                                         groups=self.groups, seq_ids=seq_ids)
        out.loss.backward()
        return out.loss.detach()


def clear_gradients(model):
    for parameter in model.parameters():
        parameter.grad = None


def gradient_error(model, expected) -> float:
    """Relative error of all parameter gradients together against `expected` (name -> gradient)."""
    diff = norm = 0.0
    for name, parameter in model.named_parameters():
        diff += float(torch.linalg.vector_norm(parameter.grad - expected[name], dtype=torch.float32)) ** 2
        norm += float(torch.linalg.vector_norm(expected[name], dtype=torch.float32)) ** 2
    return (diff / max(norm, 1e-30)) ** 0.5


@torch.no_grad()
def reference_logps(model, layout):
    """The policy's own sequence log-probs (unshared layout) plus noise: a reference the sigmoid does not saturate."""
    batch = layout.unshared()
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    logps = prefops.linear_logprobs(hidden, model.lm_head.weight, batch.targets).sum(1)
    return logps + REFERENCE_NOISE * torch.randn(logps.shape, generator=torch.Generator().manual_seed(1)).to(logps)


def bench_k(model, k, args, device):
    layout = make_layout(args, k, model.config.vocab_size, device)
    ref = reference_logps(model, layout)
    counts = layout.accounting()
    print(f"K = {k}: {counts}", file=sys.stderr)
    rows, baseline = [], {}
    for layout_name, implementation in args.rows:
        step = Step(model, layout, layout_name, implementation, ref)
        tokens = counts["tokens"] if step.shared else counts["unshared_tokens"]
        padded = counts["padded_tokens"] if step.shared else counts["unshared_padded_tokens"]

        def measure():
            clear_gradients(model)
            loss, peak = peak_during(step, device=device)
            ms = median_ms(step, device=device, reps=args.reps, warmup=args.warmup,
                           before=lambda: clear_gradients(model))
            return loss, peak, ms

        result, reason = attempt(measure)
        if reason is not None:
            rows.append([k, layout_name, implementation, tokens, padded, reason, "", "", "", ""])
            continue
        # the last timed call left its gradients: compare them with the baseline row's
        loss, peak, ms = result
        grads = {name: p.grad for name, p in model.named_parameters()}
        if not baseline:
            baseline = dict(loss=loss, grads={n: g.clone() for n, g in grads.items()}, ms=ms)
            errors = ("-", "-")
        else:
            errors = (f"{relative_error(loss, baseline['loss']):.1e}", f"{gradient_error(model, baseline['grads']):.1e}")
        rows.append([k, layout_name, implementation, tokens, padded, f"{ms:.1f}", f"{baseline['ms'] / ms:.2f}×",
                     "n/a" if peak is None else f"{peak / GIB:.2f}", *errors])
        clear_gradients(model)
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = require_device(args)
    model = build_model(args, device)
    config = model.config
    header = [
        "# Shared-prompt packing: one DPO training step, shared vs unshared",
        "",
        environment_line(device),
        "",
        f"model: Llama, {config.num_hidden_layers} layers, H {config.hidden_size}, V {config.vocab_size}, "
        f"{next(model.parameters()).dtype}, random init | {args.examples} examples × (prompt {args.prompt} + "
        f"K × response {args.response}) | loss: sigmoid DPO first-vs-rest, prefops.sequence_objective (lean) | "
        f"median of {args.reps} after {args.warmup} warm-up",
        "",
        "speed-up: baseline (first row) time / row time; errors: relative to the baseline row's loss and "
        "all parameter gradients; peak GB: peak allocated during a step beyond what was allocated before.",
    ]
    table = []
    for k in args.ks:
        table += bench_k(model, k, args, device)
    report = "\n".join(header) + "\n\n" + markdown_table(HEADERS, table)
    finish_report(report, args.out)


if __name__ == "__main__":
    main()
