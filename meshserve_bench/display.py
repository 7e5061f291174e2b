"""What ``meshserve bench`` shows besides its table: a progress bar while it runs, and
the latency plot that ``--plot FILE.png`` writes.

The bar is time-based: elapsed seconds over the run's estimate (warm-up plus
measured time of every point), on stderr, only when stderr is a terminal; the
one-line ``bench:`` messages print above it. matplotlib is the optional extra
``meshserve[bench]`` and is imported only when a plot is drawn.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TICK_S = 0.5
ALMOST_DONE = 0.99  # the bar stops here until the block ends: the estimate may be short
MISSING_EXTRA = "bench: --plot needs matplotlib: pip install 'meshserve[bench]'"


@contextlib.contextmanager
def progress_bar(description: str, estimate_s: float) -> Iterator[None]:
    """A bar filled by elapsed time over ``estimate_s`` while the block runs.

    A daemon thread owned by this context ticks it every ``TICK_S`` and is joined on
    exit; the bar is removed when the block ends. Nothing is drawn when stderr is not
    a terminal.
    """
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("elapsed, about"),
        TimeRemainingColumn(),
        TextColumn("left"),
        console=Console(stderr=True),
        auto_refresh=False,
        transient=True,
    )
    task = progress.add_task(description, total=max(estimate_s, TICK_S))
    stop = threading.Event()
    start_s = time.monotonic()

    def tick() -> None:
        while not stop.wait(TICK_S):
            progress.update(task, completed=min(time.monotonic() - start_s, ALMOST_DONE * estimate_s))
            progress.refresh()

    with progress:
        ticker = threading.Thread(target=tick, name="bench-progress", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join()


# ------------------------------------------------------------------ plot


@dataclass(frozen=True, slots=True)
class LatencySeries:
    """One line pair on the plot: p50 and p99 in ms at each x (NaN where nothing completed)."""

    label: str  # a model's name (its raw lines share the colour), or "all"
    p50_ms: Sequence[float]
    p99_ms: Sequence[float]


def require_matplotlib() -> None:
    """Exit with the extra's name before a long run whose plot could not be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(MISSING_EXTRA) from None


def plot_latency(
    path: Path,
    title: str,
    x_label: str,
    xs: Sequence[float],
    series: Sequence[LatencySeries],
    raw_ms: Mapping[str, tuple[float, float]],
) -> None:
    """Write a PNG: mesh p50 (solid) and p99 (dashed) per x for each series, and raw ONNX
    Runtime's batch-1 p50 and p99 per model (``raw_ms``: model -> (p50, p99)) as flat dotted
    lines in that model's colour; log scales."""
    require_matplotlib()
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.5), layout="constrained")
    axes = figure.add_subplot()
    colors = {line.label: f"C{index}" for index, line in enumerate(series)}
    for model in sorted(raw_ms):
        colors.setdefault(model, f"C{len(colors)}")
    for line in series:
        color = colors[line.label]
        axes.plot(xs, line.p50_ms, marker="o", color=color, label=f"mesh {line.label} p50")
        axes.plot(xs, line.p99_ms, marker="o", linestyle="--", color=color, label=f"mesh {line.label} p99")
    for model, (p50_ms, p99_ms) in sorted(raw_ms.items()):
        axes.axhline(p50_ms, color=colors[model], linestyle=":", label=f"raw {model} p50")
        axes.axhline(p99_ms, color=colors[model], linestyle="-.", label=f"raw {model} p99")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xticks(list(xs), [f"{x:g}" for x in xs])
    axes.set_xticks([], minor=True)
    axes.set_xlabel(x_label)
    axes.set_ylabel("latency, ms")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart, each as wide as its widest cell."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
