"""The canvas every report figure is drawn on: the headless backend, the theme, one colour per variant,
and saving (with the analysis's write error). Kept apart so that the figure modules import it, not each other."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are written by batch jobs

import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import seaborn as sns  # noqa: E402

from analysis import writing  # noqa: E402

DPI = 150

sns.set_theme(context="notebook", style="whitegrid")


def variant_palette(variants: Sequence[str]) -> dict[str, tuple]:
    """A fixed colour per variant, so one variant has one colour across all figures."""
    colours = sns.color_palette("colorblind" if len(variants) <= 10 else "husl", len(variants))
    return dict(zip(variants, colours))


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def finish_figure(fig: plt.Figure, path: str | Path, title: str) -> Path:
    """Give a multi-panel figure its overall title, lay it out tightly and save it."""
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def message_figure(path: str | Path, title: str, message: str) -> Path:
    """A small figure that states why there is nothing to plot."""
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, color="0.35")
    return save_figure(fig, path)
