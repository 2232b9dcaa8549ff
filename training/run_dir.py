"""The run's output folder: which one, refusing to mix two runs in it, and the metrics log's length.

A resumed run may continue in its checkpoint's folder; metrics logged after the checkpoint it resumes
from were written by steps it will redo, so :func:`truncate_metrics_log` drops them.
"""
from __future__ import annotations

import argparse
import logging
from datetime import datetime
from pathlib import Path

import utils
from inference import run_directory

_logger = logging.getLogger("cir")

# Files of a run that a fresh run in the same folder (--overwrite) deletes, besides its checkpoints.
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "bad_samples.json")


def output_directory(args: argparse.Namespace, dataset: str) -> Path:
    """``--output_dir``; else the run folder of ``--resume``; else ``runs/<dataset>_<timestamp>``."""
    if args.output_dir:
        return Path(args.output_dir)
    if args.resume:
        return run_directory(args.resume)
    return Path(f"runs/{dataset}_{datetime.now():%Y%m%d_%H%M%S}")


def claim_output_dir(output_dir: Path, args: argparse.Namespace) -> None:
    """Refuse to start a fresh run over a previous one, unless ``--overwrite`` says so.

    Without it, the first validation would replace the old ``best.pt`` and the metrics logs would mix.
    """
    if args.resume or not (output_dir / "checkpoints" / "last.pt").exists():
        return
    if not args.overwrite:
        raise FileExistsError(
            f"{output_dir} holds a previous run (checkpoints/last.pt): pass --resume "
            f"{output_dir / 'checkpoints' / 'last.pt'} to continue it, --overwrite to replace it, or another --output_dir"
        )
    _logger.warning("--overwrite: replacing the previous run in %s", output_dir)
    for name in RUN_OUTPUTS:
        (output_dir / name).unlink(missing_ok=True)
    for checkpoint in (output_dir / "checkpoints").glob("*.pt"):
        checkpoint.unlink()


def count_lines(path: Path) -> int:
    """Complete lines of a text file (0 if it does not exist)."""
    if not path.is_file():
        return 0
    with path.open("rb") as f:
        return sum(1 for line in f if line.endswith(b"\n"))


def truncate_metrics_log(path: Path, lines: int) -> int:
    """Keep the first ``lines`` lines of ``metrics.jsonl`` (records logged after a checkpoint); returns how many went."""
    if not path.is_file():
        return 0
    content = path.read_bytes().splitlines(keepends=True)
    dropped = len(content) - lines
    if dropped > 0:
        utils.atomic_write_bytes(path, b"".join(content[:lines]))
    return max(dropped, 0)
