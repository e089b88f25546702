"""tbps_compress.bench: accuracy, latency, throughput, size and memory of artifacts across runtimes.

``run_bench`` measures (torch is imported inside it); ``report`` writes CSV / JSON / Markdown and the Pareto plot.
"""

from .runner import RUNTIMES, parse_int_list, parse_runtimes, run_bench

__all__ = ["RUNTIMES", "parse_int_list", "parse_runtimes", "run_bench"]
