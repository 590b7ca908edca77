"""Packed attention benchmark: peak memory of prefops attention against the mask path as the pack grows.

    python benchmarks/bench_packed_attention.py                     # CPU: tiny Llama, 512 .. 4096 tokens
    python benchmarks/bench_packed_attention.py --tokens 512,1024 --out packed.md
    python benchmarks/bench_packed_attention.py --device cuda --tokens 8192,16384,32768

One pack of --tokens tokens in two layouts: padding-free (sequences of about
--seq-len tokens, ragged +-25%, position_ids restarting at 0, transformers'
convention) and shared prompt (prefops.shared_prompt, flat: a prompt of
--prompt tokens then --k responses of --response tokens, repeated). Each runs
through attn_implementation="prefops" (blocks, no mask), "sdpa" (transformers'
[T, T] bool mask for padding-free, the layout's dense mask for shared) and
"eager" (the additive form).

Two measurements per row. "step": one forward + backward of the decoder body
(loss: mean square of the final hidden states). "attention": one layer's
attention function alone, forward + backward, with building its mask, on
random q, k, v of the model's shape: the part that must grow linearly with the
tokens. On CPU every allocation is recorded (prefops.memory.AllocationRecorder,
peak live bytes beyond what existed before); on CUDA the allocator's peak. The
bytes-per-token columns show the growth: flat is linear, doubling with the
tokens is quadratic. The largest single allocation is listed, and prefops'
hidden states are compared with the mask path's.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

import prefops.attention as packed_attention
from common import attempt, environment_line, finish_report, markdown_table, peak_during, relative_error
from prefops.memory import AllocationRecorder
from prefops.shared_prompt import attention_mask_for, build_layout

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=8192)
IMPLEMENTATIONS = ("prefops", "sdpa", "eager")
HEADERS = ["layout", "attention", "tokens", "step peak MB", "step B/token", "attention peak MB",
           "attention B/token", "largest allocation", "hidden err"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", default="512,1024,2048,4096", help="comma-separated pack sizes")
    parser.add_argument("--seq-len", type=int, default=256, help="mean sequence length of the padding-free pack")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens of a shared-prompt example")
    parser.add_argument("--response", type=int, default=32, help="tokens per response")
    parser.add_argument("--k", type=int, default=4, help="responses per prompt")
    parser.add_argument("--rows", default=",".join(IMPLEMENTATIONS),
                        help=f"comma-separated attention implementations (of {', '.join(IMPLEMENTATIONS)})")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.rows = args.rows.split(",")
    unknown = sorted(set(args.rows) - set(IMPLEMENTATIONS))
    if unknown:
        parser.error(f"--rows takes {', '.join(IMPLEMENTATIONS)}; got {', '.join(unknown)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on CPU (the default)")
    return args


def padding_free(tokens, seq_len, vocab, device):
    """input_ids [1, tokens] and position_ids restarting at 0 for each sequence (the last one takes the rest)."""
    generator = torch.Generator().manual_seed(tokens)
    lengths, left = [], tokens
    while left:
        n = min(left, int(torch.randint(seq_len * 3 // 4, seq_len * 5 // 4 + 1, (), generator=generator)))
        lengths.append(n)
        left -= n
    ids = torch.randint(0, vocab, (1, tokens), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids.to(device), positions.to(device)


def shared(tokens, args, vocab, device):
    """A flat shared-prompt layout of whole examples, padded up to `tokens`."""
    example = args.prompt + args.k * args.response
    examples = max(1, tokens // example)
    generator = torch.Generator().manual_seed(tokens)
    ids = lambda n: torch.randint(0, vocab, (n,), generator=generator)  # noqa: E731
    layout = build_layout([ids(args.prompt) for _ in range(examples)],
                          [[ids(args.response) for _ in range(args.k)] for _ in range(examples)],
                          packing="flat", pad_to_multiple=tokens if examples * example <= tokens else 1)
    return layout.to(device)


def model_inputs(layout_name, implementation, data, dtype):
    """The keyword arguments of the body's call for one row."""
    if layout_name == "padding-free":
        ids, positions = data
        return dict(input_ids=ids, position_ids=positions)
    inputs = dict(input_ids=data.input_ids, position_ids=data.position_ids)
    if implementation == "prefops":
        return dict(inputs, prefops_layout=data)
    return dict(inputs, attention_mask=attention_mask_for(data, implementation, dtype))


def attention_call(body, layout_name, implementation, data, dtype):
    """One layer's attention (mask included) on random q, k, v: a function returning its output."""
    module = body.layers[0].self_attn
    config = body.config
    length = (data[0] if layout_name == "padding-free" else data.input_ids).shape[1]
    device = body.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(0)
    shape = lambda heads: (1, heads, length, module.head_dim)  # noqa: E731
    q, k, v = (torch.randn(shape(h), generator=generator, device=device, dtype=dtype, requires_grad=True)
               for h in (config.num_attention_heads, config.num_key_value_heads, config.num_key_value_heads))
    positions = data[1] if layout_name == "padding-free" else data.position_ids

    def run():
        if implementation == "prefops":
            kwargs = {"position_ids": positions} if layout_name == "padding-free" else {"prefops_layout": data}
            out, _ = packed_attention.attention_forward(module, q, k, v, None, scaling=module.scaling, **kwargs)
        else:
            if layout_name == "padding-free":  # what the model builds for this implementation
                masking = copy.copy(config)
                masking._attn_implementation = implementation
                embeds = torch.empty(1, length, 0, device=device, dtype=dtype)
                mask = create_causal_mask(masking, embeds, None, None, position_ids=positions)
            else:
                mask = attention_mask_for(data, implementation, dtype)
            function = sdpa_attention_forward if implementation == "sdpa" else eager_attention_forward
            out, _ = function(module, q, k, v, mask, scaling=module.scaling)
        out.square().sum().backward()
        return out.detach()
    return run


def measured(fn, device):
    """(fn(), peak bytes, the largest single allocation: bytes and op, on CPU)."""
    if device.type == "cuda":
        out, peak = peak_during(fn, device=device)
        return out, peak, "n/a"
    recorder = AllocationRecorder()
    with recorder:
        out = fn()
    nbytes, _, op = max(recorder.sizes)
    return out, recorder.peak, f"{nbytes / 2**20:.1f} MB ({op})"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    packed_attention.register()
    config = transformers.LlamaConfig(**TINY)
    config.max_position_embeddings = max(config.max_position_embeddings, *args.tokens)
    torch.manual_seed(0)
    bodies = {}
    for implementation in args.rows:
        body = transformers.LlamaModel._from_config(copy.deepcopy(config), attn_implementation=implementation)
        if bodies:
            body.load_state_dict(next(iter(bodies.values())).state_dict())
        bodies[implementation] = body.to(device, dtype)

    rows = []
    for layout_name in ("padding-free", "shared prompt"):
        for tokens in args.tokens:
            data = (padding_free(tokens, args.seq_len, config.vocab_size, device) if layout_name == "padding-free"
                    else shared(tokens, args, config.vocab_size, device))
            length = (data[0] if layout_name == "padding-free" else data.input_ids).shape[1]
            hidden = {}
            for implementation, body in bodies.items():
                inputs = model_inputs(layout_name, implementation, data, dtype)

                def step():
                    body.zero_grad(set_to_none=True)
                    out = body(use_cache=False, **inputs).last_hidden_state
                    out.float().square().mean().backward()
                    return out.detach()

                def measure():
                    out, step_peak, biggest = measured(step, device)
                    _, attention_peak, _ = measured(
                        attention_call(body, layout_name, implementation, data, dtype), device)
                    return out, step_peak, attention_peak, biggest

                result, reason = attempt(measure)
                if reason is not None:
                    rows.append([layout_name, implementation, length, reason, "", "", "", "", ""])
                    continue
                out, step_peak, attention_peak, biggest = result
                hidden[implementation] = out
                rows.append([layout_name, implementation, length, f"{step_peak / 2**20:.1f}",
                             f"{step_peak / length:.0f}", f"{attention_peak / 2**20:.1f}",
                             f"{attention_peak / length:.0f}", biggest, "-"])
            # prefops' hidden states against the first mask path that ran
            baseline = next((h for name, h in hidden.items() if name != "prefops"), None)
            if "prefops" in hidden and baseline is not None:
                row = next(r for r in rows[-len(bodies):] if r[1] == "prefops")
                row[-1] = f"{relative_error(hidden['prefops'], baseline):.1e}"

    lines = ["# Packed attention: peak memory against the mask path", "", environment_line(device), "",
             f"model: Llama, {config.num_hidden_layers} layers, H {config.hidden_size}, "
             f"{config.num_attention_heads} heads ({config.num_key_value_heads} KV), {dtype}; padding-free "
             f"sequences ~{args.seq_len} tokens; shared prompt {args.prompt} + {args.k} x {args.response}",
             "", markdown_table(HEADERS, rows)]
    finish_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
