"""The figures the library draws (matplotlib's object API: no pyplot state, any backend).

Each function returns a :class:`matplotlib.figure.Figure` with constrained layout (so the PNG
is exactly ``figsize × dpi`` pixels); :func:`save` writes it.
Values are in percent (mIoU/IoU × 100).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def save(figure: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write the figure as PNG (through a temporary name, so a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    figure.savefig(partial, dpi=dpi, format="png")  # constrained layout: the size is figsize x dpi
    partial.replace(path)
    return path


def confusion_figure(confusion: np.ndarray, classes: Sequence[str], title: str) -> Figure:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction, percent of
    each true class's pixels), over the classes present in the truth or the prediction."""
    confusion = np.asarray(confusion, dtype=np.float64)
    present = np.flatnonzero((confusion.sum(0) + confusion.sum(1)) > 0)
    matrix = confusion[np.ix_(present, present)]
    rows = matrix.sum(1, keepdims=True)
    percent = np.divide(100 * matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    names = [classes[i] for i in present]
    size = 1.5 + 0.42 * len(names)
    figure = Figure(figsize=(size + 1.2, size), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.set_xlabel("prediction")
    axes.set_ylabel("ground truth")
    axes.set_title(title)
    for (row, col), value in np.ndenumerate(percent):
        if value >= 0.5:
            axes.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=6,
                      color="white" if value > 60 else "black")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="% of the true class's pixels")
    return figure


def grouped_bars(values: dict[str, dict[str, float]], errors: dict[str, dict[str, float]] | None = None,
                 title: str = "", ylabel: str = "mIoU (%)") -> Figure:
    """One group per column key (domains), one bar per row key (runs), optional error bars."""
    runs = list(values)
    groups = list(dict.fromkeys(g for run in runs for g in values[run]))
    width = 0.8 / max(1, len(runs))
    figure = Figure(figsize=(bars_width(len(groups), len(runs)), 4.0), layout="constrained")
    axes = figure.add_subplot()
    for index, run in enumerate(runs):
        heights = [values[run].get(g, math.nan) for g in groups]
        yerr = [errors[run].get(g, 0.0) for g in groups] if errors and errors.get(run) else None
        axes.bar(np.arange(len(groups)) + (index - (len(runs) - 1) / 2) * width, heights, width,
                 yerr=yerr, capsize=2, label=run)
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    figure.legend(fontsize=7, ncols=max(1, math.ceil(len(runs) / 12)), loc="outside right upper")
    return figure


def bars_width(groups: int, runs: int) -> float:
    """Width in inches of :func:`grouped_bars`' figure (4 inches high)."""
    return max(6.0, 1.2 * groups + 0.25 * runs * groups) + 1.5


def iou_heatmaps(tables: dict[str, np.ndarray], classes: Sequence[str], domains: Sequence[str]) -> Figure:
    """One panel per run: per-class IoU (rows: classes, columns: domains), a shared 0-100 scale;
    NaN (class absent from truth and prediction) left blank."""
    names = list(tables)
    columns = min(len(names), 4)
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(0.55 * len(domains) * columns + 2.5 + 1.0 * columns, 0.28 * len(classes) * rows + 1.0),
                    layout="constrained")
    image = None
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        table = np.asarray(tables[name], dtype=np.float64)
        image = axes.imshow(np.ma.masked_invalid(table), cmap="viridis", vmin=0, vmax=100, aspect="auto")
        axes.set_xticks(range(len(domains)), domains, rotation=45, ha="right", fontsize=7)
        axes.set_yticks(range(len(classes)), classes if index % columns == 0 else [""] * len(classes), fontsize=7)
        axes.set_title(name, fontsize=8)
        for (row, col), value in np.ndenumerate(table):
            if not math.isnan(value):
                axes.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=5,
                          color="black" if value > 60 else "white")
    figure.colorbar(image, ax=figure.axes, fraction=0.05, pad=0.02, label="IoU (%)")
    return figure


def metric_vs_parameters(points: list[dict[str, Any]], parameters: Sequence[str], metrics: Sequence[str]) -> Figure:
    """One panel per swept parameter: each metric against the parameter's value, one marker per
    point (log scale where the positive values span more than a factor 10)."""
    figure = Figure(figsize=(4.2 * len(parameters), 3.4), layout="constrained")
    for index, parameter in enumerate(parameters):
        axes = figure.add_subplot(1, len(parameters), index + 1)
        xs = [point[parameter] for point in points]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        labels = None if numeric else sorted({str(x) for x in xs})
        for metric in metrics:
            pairs = [(x, p[metric]) for x, p in zip(xs, points) if p.get(metric) is not None]
            if not pairs:
                continue
            pairs.sort(key=lambda pair: pair[0] if numeric else str(pair[0]))
            px = [x if numeric else labels.index(str(x)) for x, _ in pairs]
            axes.plot(px, [y for _, y in pairs], "o", label=metric, alpha=0.8)
        if numeric and min(xs) > 0 and max(xs) / min(xs) > 10:
            axes.set_xscale("log")
        if labels is not None:
            axes.set_xticks(range(len(labels)), labels)
        axes.set_xlabel(parameter.rsplit(".", 1)[-1])
        axes.set_ylabel("mIoU (%)")
        axes.grid(alpha=0.3)
        if index == 0:
            axes.legend(fontsize=7)
    return figure
