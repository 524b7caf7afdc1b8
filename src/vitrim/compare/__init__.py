"""``vitrim compare``: every method at a sweep of strengths against the unreduced model, side by side.

:mod:`~vitrim.compare.run` measures (GMACs, parameters, top-1, same-run throughput, batch-1 latency);
:mod:`~vitrim.compare.report` writes the tables and plots.
"""
from .report import (markdown_table, pareto_front, plot_results, skipped_note, terminal_table, untrained_methods,
                     write_csv, write_html, write_report)
from .result import CompareResult, Row
from .run import compare, default_sweep, parse_checkpoints, parse_sweep

__all__ = ["Row", "CompareResult", "compare", "default_sweep", "parse_sweep", "parse_checkpoints", "pareto_front",
           "markdown_table", "terminal_table", "write_csv", "plot_results", "untrained_methods", "write_report",
           "write_html", "skipped_note"]
