"""Core-op benchmark: DPO (sigmoid, beta 0.1) forward+backward from final hidden states and lm_head.

    python benchmarks/bench_core.py --out results.md            # one GPU, one process
    python benchmarks/bench_core.py --device cpu --tiny         # smoke test of the script's logic

Every row gets the same data and is compared with the floor (the three GEMMs
any exact method must run over the counted tokens), and its loss and
gradients are checked against an fp32 version of the naive row so a
fast-but-wrong row shows. The machinery is prefops.tools.bench (also behind
`prefops bench`); this script fixes the three shapes of the results log.
See benchmarks/README.md for setting up a GPU box.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from prefops.tools.bench import (  # noqa: F401 - Problem, make_problem, ... stay importable from here
    BENCH_ROWS, BETA, FORWARD_HEADERS, ROWS, TABLE_HEADERS, Problem, Row, Shape, add_choices_option, add_timing_options,
    bench_shape, finish_report, make_problem, markdown_table, reference_outputs, report_heading, require_device,
    setup_lines, timing_defaults,
)

SHAPES = {
    "A": Shape(pairs=4, tokens=1024, hidden=4096, vocab=128256),
    "L": Shape(pairs=1, tokens=16384, hidden=4096, vocab=128256),
    "Q": Shape(pairs=8, tokens=512, hidden=3584, vocab=152064),
}
TINY_SHAPES = {
    "A": Shape(pairs=4, tokens=64, hidden=64, vocab=1000),
    "L": Shape(pairs=1, tokens=512, hidden=64, vocab=1000),
    "Q": Shape(pairs=8, tokens=32, hidden=48, vocab=1200),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_choices_option(parser, "--shapes", SHAPES)
    add_choices_option(parser, "--rows", BENCH_ROWS)
    add_choices_option(parser, "--forward-shapes", SHAPES, "A",
                       "shapes that also get the forward-only table ('' for none)")
    add_timing_options(parser)
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    timing_defaults(args)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = require_device(args)
    shapes = TINY_SHAPES if args.tiny else SHAPES

    header = [
        *report_heading("prefops core-op benchmark", args.tiny, device),
        "",
        *setup_lines(args, device),
        "",
        "Shapes: " + "; ".join(f"{n}: {s.pairs} pairs × {s.tokens} tokens, H {s.hidden}, V {s.vocab}"
                               for n, s in shapes.items() if n in args.shapes),
    ]
    tables, forward_tables = [], []
    for name in args.shapes:
        table, forward_table = bench_shape(name, shapes[name], args, device)
        tables += table
        forward_tables += forward_table

    report = "\n".join(header) + "\n\n## Forward + backward\n\n" + markdown_table(TABLE_HEADERS, tables)
    if forward_tables:
        report += "\n\n## Forward only (per-token log-probs)\n\n" + markdown_table(FORWARD_HEADERS, forward_tables)
    finish_report(report, args.out)


if __name__ == "__main__":
    main()
