"""Command-line tools over the core: `prefops` (cli), benchmarks (bench), the float64
comparison of every op (compare) and the CPU demo. Nothing in the core imports them."""
