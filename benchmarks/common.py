"""Timing, memory and reporting helpers shared by the benchmark scripts.

They live in the package (prefops.tools.bench, which `prefops bench` runs on) and are
re-exported here under the names the scripts import. Everything takes a
torch.device so a script can also run on CPU as a smoke test.
"""
from prefops.tools.bench import (  # noqa: F401 - re-exports
    GIB, Skipped, add_choices_option, add_timing_options, attempt, choices_option, environment_line, finish_report,
    fmt_gb, fmt_ms, free_memory, markdown_table, median_ms, peak_during, relative_error, require_device,
    timing_defaults, write_report,
)
