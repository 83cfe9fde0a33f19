"""FID-against-a-knob line plots as PNGs (`epg fid sweep`): one line per series, optionally one point ringed."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence


def line_plot(
    path: str | os.PathLike,
    series: Mapping[str, Sequence[tuple[float, float]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    ring: tuple[float, float, str] | None = None,
) -> bool:
    """Each ``series`` label's (x, y) points as a line (sorted by x), ``ring`` = (x, y, label) circled, saved to
    ``path``; False (with a note on stderr) without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("epg fid sweep: matplotlib is not installed, so no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    for label, points in series.items():
        line = sorted(points)
        ax.plot([x for x, _ in line], [y for _, y in line], marker="o", label=label)
    if ring is not None:
        ax.scatter([ring[0]], [ring[1]], s=160, facecolors="none", edgecolors="black", zorder=3, label=ring[2])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True
