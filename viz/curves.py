"""Training curves from a run's ``metrics.jsonl``: loss per step and per epoch, every validation recall per epoch.

The best epoch (:func:`best_epoch`, the one the training loop keeps) is marked in green. Drawn on
matplotlib's Agg canvas directly, so no display is needed and the global backend is untouched.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import utils
from viz.style import GT_COLOUR_HEX

__all__ = ["read_epoch_metrics", "best_epoch", "plot_training_curves"]

_RECALL_NAME = re.compile(r"Rs?@\d+$")


def read_epoch_metrics(metrics_log: str | os.PathLike) -> pd.DataFrame:
    """Per-epoch training loss and validation metrics from ``metrics.jsonl``, indexed by epoch.

    Columns keep their logged names (``train/epoch_loss``, ``val/R@1``, ...). A resumed run logs
    some epochs twice; the last record of an epoch wins.
    """
    metrics_log = Path(metrics_log)
    if not metrics_log.is_file():
        raise FileNotFoundError(f"{metrics_log}: metrics log not found")
    frame = utils.read_metrics_log(metrics_log)
    if frame.empty or "epoch" not in frame:
        raise ValueError(f"{metrics_log}: no per-epoch records")
    columns = [c for c in frame.columns if c == "train/epoch_loss" or c.startswith("val/")]
    per_epoch = frame.dropna(subset=["epoch"]).groupby("epoch")[columns].last()
    per_epoch.index = per_epoch.index.astype(int)
    return per_epoch.dropna(how="all")


def best_epoch(per_epoch: pd.DataFrame, key: str = "val/mean") -> int | None:
    """The epoch the training loop keeps as best: the first with the highest ``key`` (None if unlogged)."""
    if key not in per_epoch or per_epoch[key].isna().all():
        return None
    return int(per_epoch[key].idxmax())


def plot_training_curves(
    metrics_log: str | os.PathLike, output: str | os.PathLike, figsize: tuple[float, float] = (12.0, 4.5), dpi: int = 100,
    best_key: str = "val/mean",
) -> Path:
    """PNG of the loss (per step and per epoch) and every validation recall per epoch, best epoch marked.

    The image is exactly ``figsize * dpi`` pixels. The best epoch is chosen by ``best_key`` (the
    training run's ``--best_metric``; default the mean recall).
    """
    metrics_log = Path(metrics_log)
    per_epoch = read_epoch_metrics(metrics_log)
    steps = utils.read_metrics_log(metrics_log)
    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    loss_ax, recall_ax = figure.subplots(1, 2)

    epoch_loss = per_epoch["train/epoch_loss"].dropna() if "train/epoch_loss" in per_epoch else pd.Series(dtype=float)
    if "train/loss" in steps and "step" in steps and not epoch_loss.empty:
        # Per-step losses on the epoch axis: steps per epoch from the step count at the last epoch end.
        ends = steps.dropna(subset=["train/epoch_loss"])
        steps_per_epoch = float(ends["step"].iloc[-1]) / max(float(ends["epoch"].iloc[-1]), 1.0)
        step_loss = steps.dropna(subset=["train/loss"])
        loss_ax.plot(step_loss["step"] / steps_per_epoch, step_loss["train/loss"], color="0.7", lw=1, label="step loss")
    if not epoch_loss.empty:
        loss_ax.plot(epoch_loss.index, epoch_loss.values, "o-", color="C0", label="epoch mean loss")
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="loss")

    recalls = [c for c in per_epoch.columns if c.startswith("val/") and _RECALL_NAME.search(c)]
    for i, column in enumerate(recalls):
        series = per_epoch[column].dropna()
        recall_ax.plot(series.index, series.values, "o-", ms=3, color=f"C{i % 10}", label=column.removeprefix("val/"))
    if "val/mean" in per_epoch:
        mean = per_epoch["val/mean"].dropna()
        recall_ax.plot(mean.index, mean.values, "k--", lw=2, label="mean")
    recall_ax.set(title="validation recall (%)", xlabel="epoch", ylabel="recall (%)")

    best = best_epoch(per_epoch, best_key)
    if best is not None:
        for ax in (loss_ax, recall_ax):
            ax.axvline(best, color=GT_COLOUR_HEX, ls=":", lw=2)
        value = per_epoch.loc[best, best_key]
        recall_ax.plot([best], [value], "*", ms=16, color=GT_COLOUR_HEX, label=f"best: epoch {best} ({value:.2f})")
    for ax in (loss_ax, recall_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if loss_ax.lines:
        loss_ax.legend(fontsize=7, loc="upper right")
    if recall_ax.lines:
        # Outside the axes: recall lines cross the whole plot.
        recall_ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=2 if len(recall_ax.lines) > 12 else 1)
    figure.suptitle(f"{metrics_log.parent.name}: training curves")
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    utils.atomic_write_bytes(output, buffer.getvalue())
    return output
