"""PNG plots with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt


def bars(
    path: Path,
    title: str,
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    ylabel: str,
    *,
    log: bool = False,
) -> str:
    """Grouped bars: one group per entry of `groups`, one bar per series."""
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    count = max(1, len(series))
    width = 0.8 / count
    for index, (name, values) in enumerate(series.items()):
        xs = [g + (index - (count - 1) / 2) * width for g in range(len(groups))]
        ys = [0.0 if math.isnan(v) else v for v in values]
        drawn = ax.bar(xs, ys, width, label=name)
        ax.bar_label(drawn, labels=[_short(v) for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def lines(
    path: Path,
    title: str,
    xs: Sequence[float],
    series: dict[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    *,
    logx: bool = False,
    hline: float | None = None,
    hline_label: str = "",
) -> str:
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for name, values in series.items():
        ax.plot(xs, values, marker="o", label=name)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1, label=hline_label or None)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def timeline(
    path: Path,
    title: str,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    marks: dict[str, float],
    xlabel: str,
    ylabel: str,
) -> str:
    """Step lines over time (each series its own xs), with labelled vertical marks."""
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for name, (xs, ys) in series.items():
        ax.step(xs, ys, where="post", label=name)
    for (label, at), style in zip(marks.items(), (":", "--", "-."), strict=False):
        ax.axvline(at, color="grey", linestyle=style, linewidth=1, label=f"{label} ({at:.3f} s)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _short(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
