"""Feedback for people: a fixed-width table per label, and a PNG of IoU per label over time.

The chart plots, for each label, the running mean IoU over that label's records so far (in time
order): single tasks are noisy, the running mean shows whether pre-annotation gets better.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # render to files only: servers and CI have no display

import matplotlib.dates as mdates
import matplotlib.pyplot as plt

from backend.labelstudio.corrections import LabelSummary
from backend.storage.feedback_log import FeedbackRecord

CHART_TITLE = "Pre-annotation IoU per label"
CHART_SIZE_INCHES = (9.0, 5.0)
CHART_DPI = 100
# Half the x range shown when all records share one instant (matplotlib would show years).
SINGLE_INSTANT_PADDING = timedelta(hours=1)

_HEADER = ("label", "n", "mean IoU", "kept", "edited", "deleted", "added")
PERIODS = 5  # the over-time table splits the annotations, in time order, into at most this many groups


def format_table(summary: Mapping[str, LabelSummary]) -> str:
    """A fixed-width text table, one row per label sorted by label, for logs and terminals."""
    rows = [_HEADER] + [_row(summary[label]) for label in sorted(summary)]
    return _fixed_width(rows)


def format_over_time(records: Iterable[FeedbackRecord], periods: int = PERIODS,
                     taught: Mapping[str, int] | None = None) -> str:
    """Per label, whether the memory was taught it, and the mean IoU of ``periods`` groups of annotations, oldest first.

    ``taught`` maps each label the project's memory holds to its regions taught (None: the memory
    could not be read, shown ``?``); a label taught but never corrected gets a line too. The columns
    are named by the annotations they hold (``1-20``: the first twenty); a label no annotation of a
    group has shows ``-`` there. Rising figures: pre-annotation got better.
    """
    ordered = sorted(records, key=lambda r: r.timestamp)
    bounds = [round(i * len(ordered) / min(periods, len(ordered))) for i in range(min(periods, len(ordered)) + 1)]
    groups = [ordered[start:end] for start, end in zip(bounds, bounds[1:])]
    labels = sorted({f.label for record in ordered for f in record.labels} | set(taught or {}))
    header = ("label", "taught", *(f"{start + 1}-{end}" for start, end in zip(bounds, bounds[1:])))
    rows = [header]
    for label in labels:
        cells = []
        for group in groups:
            ious = [f.iou for record in group for f in record.labels if f.label == label]
            cells.append(f"{sum(ious) / len(ious):.3f}" if ious else "-")
        regions = "?" if taught is None else f"{taught[label]} regions" if label in taught else "no"
        rows.append((label, regions, *cells))
    return _fixed_width(rows)


def _fixed_width(rows: list[tuple[str, ...]]) -> str:
    """Rows as columns: the first left-aligned, the others right-aligned, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _row(item: LabelSummary) -> tuple[str, ...]:
    return (item.label, str(item.count), f"{item.mean_iou:.3f}", str(item.kept), str(item.edited),
            str(item.deleted), str(item.added))


def render_chart(records: Iterable[FeedbackRecord], path: Path) -> Path:
    """Write a PNG of each label's running mean IoU against record time (UTC) to ``path``."""
    series = _running_means(records)
    if not series:
        raise ValueError("no label feedback to chart")
    figure, axes = plt.subplots(figsize=CHART_SIZE_INCHES, dpi=CHART_DPI)
    try:
        for label, (times, means) in sorted(series.items()):
            axes.plot(times, means, marker="o", markersize=3, label=label)  # a marker shows a lone record
        _decorate(axes, [when for times, _ in series.values() for when in times])
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return Path(path)


def _running_means(records: Iterable[FeedbackRecord]) -> dict[str, tuple[list[datetime], list[float]]]:
    """Per label: the record times and the mean IoU of the label over the records up to each."""
    series: dict[str, tuple[list[datetime], list[float]]] = defaultdict(lambda: ([], []))
    totals: dict[str, tuple[float, int]] = defaultdict(lambda: (0.0, 0))
    for record in sorted(records, key=lambda r: r.timestamp):
        when = datetime.fromtimestamp(record.timestamp, tz=timezone.utc)
        for feedback in record.labels:
            total, count = totals[feedback.label]
            totals[feedback.label] = total, count = total + feedback.iou, count + 1
            times, means = series[feedback.label]
            times.append(when)
            means.append(total / count)
    return dict(series)


def _decorate(axes: plt.Axes, times: list[datetime]) -> None:
    if min(times) == max(times):
        axes.set_xlim(times[0] - SINGLE_INSTANT_PADDING, times[0] + SINGLE_INSTANT_PADDING)
    locator = mdates.AutoDateLocator(tz=timezone.utc)
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=timezone.utc))
    axes.set_ylim(0.0, 1.05)
    axes.set_title(CHART_TITLE)
    axes.set_xlabel("Record time (UTC)")
    axes.set_ylabel("IoU (running mean)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    axes.figure.tight_layout()
