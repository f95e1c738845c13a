"""PNG plots for the compare and audit reports (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from influence.artifacts import atomic_path
from influence.errors import InfluenceError


def _figure():
    try:
        import matplotlib
    except ImportError as exc:
        raise InfluenceError('plots need matplotlib, an optional extra, which is not installed; pip install -e ".[demo]"') from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain_label(text) -> str:
    """A label drawn as written: matplotlib would parse "$...$" as math (and fail on bad math), so dollars are escaped,
    and it would leave a label starting with "_" out of the legend, so a zero-width space goes in front."""
    text = str(text).replace("$", r"\$")
    return "\u200b" + text if text.startswith("_") else text


def plot_against_size(table: pa.Table, value: str, series: str, path: Path, title: str, ylabel: str) -> Path:
    """One line per `series` value: `value` against model parameters (log x axis)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    params = np.asarray(table["parameters"].to_pylist(), dtype=float)
    values = np.asarray(table[value].to_pylist(), dtype=float)
    labels = np.asarray(table[series].to_pylist())
    for label in sorted(set(labels)):
        mask = labels == label
        order = np.argsort(params[mask])
        ax.plot(params[mask][order], values[mask][order], marker="o", label=plain_label(label))
    ax.set_xscale("log")
    ax.set_xlabel("model parameters")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def plot_histogram(values: np.ndarray, path: Path, title: str, xlabel: str) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = values[np.isfinite(values)]
    positive = values[values > 0]
    spread = len(positive) > 1 and positive.max() > positive.min()  # log bins need a range (one sequence has none)
    bins = np.logspace(np.log10(positive.min()), np.log10(positive.max()), 40) if spread else 40
    ax.hist(positive if spread else values, bins=bins, color="#268bd2")
    if spread:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("sequences")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
