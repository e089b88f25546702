"""Benchmark reports: CSV and JSON rows, a Markdown table, a rich table for the terminal and the Pareto plot
(R@1 against query latency and against gallery throughput, the Pareto front marked, points labelled)."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io_utils import atomic_folder

log = logging.getLogger(__name__)

__all__ = ["markdown_table", "pareto_front", "pareto_plot", "print_table", "rich_table", "write_report"]

CSV_FILE, JSON_FILE, MD_FILE, PLOT_FILE = "bench.csv", "bench.json", "bench.md", "pareto.png"
REPORT_FILES = (CSV_FILE, JSON_FILE, MD_FILE, PLOT_FILE)  # all a report folder holds: --force replaces nothing else

# (header, row key, number format); None keys are computed.
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "label", "s"),
    ("status", "status", "status"),
    ("R@1", "R1", ".2f"),
    ("R@5", "R5", ".2f"),
    ("R@10", "R10", ".2f"),
    ("mAP", "mAP", ".2f"),
    ("mINP", "mINP", ".2f"),
    ("text p50 ms", "text_p50_ms", ".2f"),
    ("text p90 ms", "text_p90_ms", ".2f"),
    ("img/s", "image_ips", ".1f"),
    ("search p50 ms", "search_p50_ms", ".2f"),
    ("params M", "params_total", "M"),
    ("GMACs img", "macs_image", "G"),
    ("GMACs txt", "macs_text", "G"),
    ("file MB", "file_mb", ".1f"),
    ("peak MB", "peak_mem_mb", ".0f"),
    ("img % ceil", "image_pct_of_ceiling", ".1f"),
    ("txt % ceil", "text_pct_of_ceiling", ".2f"),
)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "status":
        return str(value).split(":", 1)[0]
    if fmt == "s" or not _is_num(value):
        return str(value)
    if fmt == "M":
        return f"{value / 1e6:.2f}"
    if fmt == "G":
        return f"{value / 1e9:.3f}"
    return format(value, fmt)


def _columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    cols = list(_COLUMNS)
    batch = _throughput_batch(rows)
    if batch is not None:
        cols = [(f"img/s @{batch}" if key == "image_ips" else h, key, f) for h, key, f in cols]
    if not any(r.get("R1") is not None for r in rows):
        cols = [c for c in cols if c[1] not in ("R1", "R5", "R10", "mAP", "mINP")]
    return cols


def _throughput_batch(rows: Sequence[dict[str, Any]]) -> int | None:
    batches = sorted({int(k[len("image_b"):-len("_ips")]) for r in rows for k in r
                      if k.startswith("image_b") and k.endswith("_ips")})
    if not batches:
        return None
    return 32 if 32 in batches else batches[-1]


# ---------------------------------------------------------------------------------------------------------------------
# Pareto front
# ---------------------------------------------------------------------------------------------------------------------


def pareto_front(xs: Sequence[float], ys: Sequence[float], *, x_lower_better: bool = True) -> list[int]:
    """Indices of the points no other point dominates, sorted by x; y (accuracy) is maximised, x minimised
    (latency) or maximised (throughput) as ``x_lower_better`` says. A point dominates another when it is at least
    as good on both axes and strictly better on one; equal points are all kept. NaN / None points are left out."""
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys differ in length: {len(xs)} vs {len(ys)}")
    pts = [(i, float(x), float(y)) for i, (x, y) in enumerate(zip(xs, ys, strict=True))
           if _is_num(x) and _is_num(y)]
    sign = 1.0 if x_lower_better else -1.0
    front = []
    for i, x, y in pts:
        dominated = False
        for j, x2, y2 in pts:
            if j == i:
                continue
            better_x = sign * x2 <= sign * x
            if better_x and y2 >= y and (sign * x2 < sign * x or y2 > y):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (float(xs[i]), -float(ys[i])))


def pareto_plot(rows: Sequence[dict[str, Any]], path: Path, title: str | None = None) -> Path | None:
    """Save the two-panel Pareto plot (R@1 vs query latency p50; R@1 vs gallery images/s). Returns the path, or
    None (with a logged reason) when no row has both R@1 and a timing."""
    ok = [r for r in rows if str(r.get("status")) == "ok" and _is_num(r.get("R1"))]
    panels = [("text_p50_ms", "query latency p50, ms (text encoder, batch 1)", True),
              ("image_ips", f"gallery throughput, images/s (batch {_throughput_batch(rows)})", False)]
    if not any(_is_num(r.get(key)) for r in ok for key, _, _ in panels):
        log.warning("no Pareto plot: no benchmarked row has both R@1 and a timing (was --data given?)")
        return None
    try:
        import matplotlib
    except ImportError:
        log.warning("no Pareto plot: matplotlib is not installed")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for ax, (key, xlabel, lower) in zip(axes, panels, strict=True):
        pts = [r for r in ok if _is_num(r.get(key))]
        xs = [float(r[key]) for r in pts]
        ys = [float(r["R1"]) for r in pts]
        front = set(pareto_front(xs, ys, x_lower_better=lower))
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            on = i in front
            ax.scatter([x], [y], s=60 if on else 30, c="tab:red" if on else "tab:blue", zorder=3,
                       edgecolors="black" if on else "none")
            # Labels of close points are staggered vertically so they stay readable.
            ax.annotate(pts[i]["label"], (x, y), textcoords="offset points", xytext=(5, 4 - 11 * (i % 3)),
                        fontsize=7)
        order = sorted(front, key=lambda i: xs[i])
        if order:
            ax.plot([xs[i] for i in order], [ys[i] for i in order], "--", c="tab:red", lw=1.2,
                    label="Pareto front", zorder=2)
            ax.legend(loc="lower right" if lower else "lower left", fontsize=8)
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel + (" (lower is better)" if lower else " (higher is better)"))
        ax.set_ylabel("R@1 (%)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title or "Accuracy vs speed")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# tables and files
# ---------------------------------------------------------------------------------------------------------------------


def grouped_bars(path: Path, groups: Sequence[str], series: dict[str, Sequence[float]], ylabel: str) -> Path:
    """A bar chart with one group of bars per entry of ``groups`` (e.g. attribute families) and one bar per series
    (e.g. compressed models) in each, around a zero line: the per-attribute plots of the studies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8.0, 0.45 * len(groups)), 4))
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([k + i * width for k in range(len(groups))], list(values), width, label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks([k + width * (len(series) - 1) / 2 for k in range(len(groups))], list(groups), rotation=60,
                  ha="right")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def markdown_table(rows: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    """A Markdown table of the main columns, the skip / error reasons below it, and how it was measured."""
    cols = _columns(rows)
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |",
             "|" + "|".join("---" if f in ("s", "status") else "---:" for _, _, f in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), f).replace("|", "/") for _, k, f in cols) + " |")
    notes = [f"- {r['label']}: {r['status']}" for r in rows if str(r.get("status", "")) != "ok"]
    grouped: dict[str, list[str]] = {}
    for r in rows:
        if r.get("notes") and str(r.get("status")) == "ok":
            grouped.setdefault(str(r["notes"]), []).append(str(r["label"]))
    notes += [f"- {', '.join(labels)}: {note}" for note, labels in grouped.items()]
    out = "\n".join(lines) + "\n"
    if notes:
        out += "\nNotes:\n\n" + "\n".join(notes) + "\n"
    if meta:
        env = meta.get("environment", {})
        ceil = ", ".join(f"{k} {v['gflops'] / 1e3:.3f} TFLOP/s ({v['method']})"
                         for k, v in meta.get("ceilings", {}).items())
        out += (
            "\nHow it was measured:\n\n"
            f"- device: {meta.get('device')} ({env.get('device_name')}); CPU {env.get('cpu')} x{env.get('cpu_count')}"
            f" ({', '.join(env.get('cpu_flags', []))})\n"
            f"- threads: {meta.get('threads') or 'library default'} (torch uses {env.get('torch_threads')}); "
            f"warm-up {meta.get('warmup')}, repetitions {meta.get('reps')} (a measurement stops early after "
            f"{meta.get('max_time_s')} s with at least 3 timed)\n"
            f"- batches: {meta.get('batches')}; gallery throughput at batch {meta.get('throughput_batch')}; "
            f"search: {meta.get('method', {}).get('search')}\n"
            f"- versions: python {env.get('python')}, torch {env.get('torch')}, onnxruntime "
            f"{env.get('onnxruntime')}, numpy {env.get('numpy')}"
            + (f", CUDA {env.get('cuda')}" if env.get("cuda") else "") + "\n"
            f"- machine ceiling: {ceil or '-'}\n"
            f"- memory: {meta.get('method', {}).get('memory')}\n"
        )
    return out


def rich_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> Any:
    """The Markdown table's columns as a ``rich.table.Table``."""
    from rich.table import Table

    table = Table(title=title)
    cols = _columns(rows)
    for h, _, f in cols:
        table.add_column(h, justify="left" if f in ("s", "status") else "right", no_wrap=f in ("s", "status"))
    for r in rows:
        table.add_row(*(_fmt(r.get(k), f) for _, k, f in cols))
    return table


def print_table(rows: Sequence[dict[str, Any]], title: str | None = None, console: Any = None) -> None:
    """Print the table and the skip / error reasons to the terminal with rich (for the CLI)."""
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: do not fold the table at 80 columns
            console = Console(width=240)
    console.print(rich_table(rows, title))
    for r in rows:
        if str(r.get("status", "")) != "ok":
            console.print(f"{r['label']}: {r['status']}", markup=False, highlight=False)


def _fieldnames(rows: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in rows:
        names += [k for k in r if k not in names]
    return names


def _csv_value(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v)


def write_report(rows: Sequence[dict[str, Any]], meta: dict[str, Any], out: Path, *,
                 force: bool = False) -> dict[str, Path | None]:
    """Write ``bench.csv``, ``bench.json`` (``{"meta", "rows"}``), ``bench.md`` and ``pareto.png`` into the folder
    ``out``: all four into a temporary sibling renamed onto ``out`` once complete (a full disk leaves neither a
    partial folder nor a changed one). An existing non-empty ``out`` is replaced only with ``force``, and only when
    it holds nothing but these files (an earlier report)."""
    out = Path(out)
    with atomic_folder(out, force=force, flag="--out", owned=REPORT_FILES) as tmp:
        with open(tmp / CSV_FILE, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=_fieldnames(rows))
            writer.writeheader()
            for r in rows:
                writer.writerow({k: _csv_value(v) for k, v in r.items()})
        (tmp / JSON_FILE).write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=2, default=str) + "\n",
                                     encoding="utf-8")
        (tmp / MD_FILE).write_text(markdown_table(rows, meta), encoding="utf-8")
        plot = pareto_plot(rows, tmp / PLOT_FILE)
    paths: dict[str, Path | None] = {"csv": out / CSV_FILE, "json": out / JSON_FILE, "md": out / MD_FILE,
                                     "png": out / PLOT_FILE if plot is not None else None}
    log.info("benchmark report written to %s", out)
    return paths
