"""The run report: ``report.md`` in a run folder, this run's metrics next to the published SSN numbers.

The published numbers are data (``viz/published.json``, the table of docs/benchmarks.md), matched to a run
by its metric names (:func:`dataset_of`). The report links the training curves (:mod:`viz.curves`) and the
retrieval grids ``validate.py --visualize`` wrote (:mod:`viz.grid`), and lists arguments and environment.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import open_clip
import torch

import utils
from dataset_registry import DATASETS
from metrics import metric_meanings
from viz.curves import best_epoch, plot_training_curves, read_epoch_metrics
from viz.grid import relative_link

__all__ = ["PUBLISHED_FILE", "load_published", "dataset_of", "write_run_report", "write_run_report_safely"]

_logger = logging.getLogger("cir.viz")

PUBLISHED_FILE = Path(__file__).with_name("published.json")


def load_published(path: str | os.PathLike = PUBLISHED_FILE) -> dict[str, dict[str, Any]]:
    """Published SSN numbers by dataset: ``{dataset: {"label": str, "metrics": {name: percent}}}``.

    Numbers are on the real benchmarks with ViT-B/32 (CIRR: test split, FashionIQ: val), in table order.
    """
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _read_json_if_present(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def dataset_of(metrics: Mapping[str, float]) -> str | None:
    """Which published numbers are comparable, judged by the metric names themselves
    (``DatasetSpec.identifying_metrics``)."""
    for spec in DATASETS.values():
        if all(key in metrics for key in spec.identifying_metrics):
            return spec.name
    return None


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _environment(device: str | None) -> list[tuple[str, str]]:
    return [
        ("python", sys.version.split()[0]),
        ("platform", platform.platform()),
        ("torch", torch.__version__),
        ("open_clip", open_clip.__version__),
        ("device", device or ("cuda" if torch.cuda.is_available() else "cpu")),
        ("CUDA available", str(torch.cuda.is_available())),
    ]


def write_run_report(
    run_dir: str | os.PathLike, device: str | None = None, validation_json: str | os.PathLike | None = None,
    report_path: str | os.PathLike | None = None,
) -> Path:
    """Write the run's report (default ``<run_dir>/report.md``, with ``curves.png`` drawn from ``metrics.jsonl``)
    and return its path.

    Uses whatever the run folder holds: ``args.json``, ``summary.json`` (best validation during
    training), ``metrics.jsonl``, and the validation JSON of ``validate.py`` (default
    ``<run_dir>/validation.json``) with the grids beside it. Missing parts are left out.  A report elsewhere
    (``report_path``: a validation's own folder) links the run's curves and leaves the run's files as they are.
    """
    run_dir = Path(run_dir)
    validation_json = Path(validation_json) if validation_json else run_dir / "validation.json"
    report = Path(report_path) if report_path else run_dir / "report.md"
    owns_run_files = report.parent.resolve() == run_dir.resolve()
    args = _read_json_if_present(run_dir / "args.json") or {}
    summary = _read_json_if_present(run_dir / "summary.json") or {}
    validation = _read_json_if_present(validation_json) or {}

    per_epoch = None
    curves = run_dir / "curves.png"
    best_key = f"val/{summary.get('best_metric_name', 'mean')}"
    if (run_dir / "metrics.jsonl").is_file():
        per_epoch = read_epoch_metrics(run_dir / "metrics.jsonl")
        if owns_run_files:
            plot_training_curves(run_dir / "metrics.jsonl", curves, best_key=best_key)
    best = summary.get("best_epoch") or (best_epoch(per_epoch, best_key) if per_epoch is not None else None)

    columns: list[tuple[str, Mapping[str, float]]] = []
    if summary.get("best_metrics"):
        by = summary.get("best_metric_name", "mean")
        columns.append((f"ours: best val during training by {by}{f' (epoch {best})' if best else ''}", summary["best_metrics"]))
    for method, metrics in (validation.get("metrics") or {}).items():
        columns.append((f"ours: validate.py, {method}", metrics))
    dataset = next((dataset_of(m) for _, m in columns if dataset_of(m)), None)
    published = load_published().get(dataset or "")
    if published:
        columns.append((published["label"], published["metrics"]))
    keys: list[str] = list(published["metrics"]) if published else []
    for _, metrics in columns:
        keys += [k for k in metrics if k not in keys]

    model = args.get("clip_model_name", "?")
    title = f"Run report: {run_dir.name}" if owns_run_files else f"Validation report: {run_dir.name}, {report.parent.name}"
    lines = [f"# {title}", "", f"Written {datetime.now():%Y-%m-%d %H:%M:%S}.", "", "## Metrics (%)", ""]
    if columns:
        lines += [
            f"**ours** = this run: `{model}` (pretrained: `{args.get('pretrained', '?')}`) on the *val* split of "
            f"`{args.get('data_root', '?')}` (the data this run used). "
            "**published** = the SSN paper (docs/benchmarks.md): real benchmark, OpenAI ViT-B/32. "
            "The columns are comparable only when ours is also the real benchmark with ViT-B/32; "
            "on synthetic data this table is a functional check, not a reproduction.",
            "",
            _markdown_table(["metric", *(label for label, _ in columns)],
                            [[key, *(f"{m[key]:.2f}" if key in m else "-" for _, m in columns)] for key in keys]),
            "",
            "What the metrics are:",
            "",
            *(f"- `{key}`: {meaning}" for key, meaning in metric_meanings(keys).items()),
        ]
    else:
        lines.append("No metrics yet.")
    if curves.is_file():
        lines += ["", "## Training curves", "", f"![training curves]({relative_link(curves, report.parent)})"]
    grids = sorted(validation_json.parent.glob(f"{validation_json.stem}_*_grid.png"))
    if grids:
        lines += ["", "## Retrieval examples", ""]
        for png in grids:
            page = png.with_suffix(".html")
            link = f" ([HTML page]({relative_link(page, report.parent)}))" if page.is_file() else ""
            lines += [f"![retrieval grid]({relative_link(png, report.parent)}){link}", ""]
    if summary:
        rows = [[k, v] for k, v in summary.items() if k not in ("best_metrics", "best_by")]
        rows += [[f"best {criterion}", f"{b['value']:.2f} (epoch {b['epoch']})"]
                 for criterion, b in (summary.get("best_by") or {}).items()]
        lines += ["", "## Training summary", "", _markdown_table(["", "value"], rows)]
        if summary.get("best_by"):
            lines += ["", "`best <metric>`: the best validation by that metric (see the legend above) and its epoch."]
    if args:
        shown = {k: ("(set, not shown)" if k in utils.SECRET_ARGS and v else v) for k, v in args.items()}
        for name in ("precision", "eval_precision"):  # what was asked, and what ran when that differs
            if name in shown and summary.get(name) not in (None, shown[name]):
                shown[name] = f"{shown[name]} (ran {summary[name]} on this device)"
        lines += ["", "## Arguments", "", _markdown_table(["argument", "value"], sorted(shown.items()))]
    lines += ["", "## Environment", "", _markdown_table(["", "version"], _environment(device)), ""]
    utils.atomic_write_bytes(report, "\n".join(lines).encode("utf-8"))
    return report


def write_run_report_safely(run_dir: str | os.PathLike, **kwargs: Any) -> Path | None:
    """:func:`write_run_report` for the end of a run: a failure is logged, never raised.

    The report is a by-product; a plotting problem must not turn a finished training into a crash.
    """
    try:
        return write_run_report(run_dir, **kwargs)
    except Exception as error:  # anything matplotlib / PIL / IO may raise; checkpoints are already on disk
        _logger.warning("run report not written to %s (%s: %s); checkpoints and metrics are unaffected",
                        run_dir, type(error).__name__, error)
        return None
