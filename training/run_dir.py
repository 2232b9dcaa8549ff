"""The run's output folder: which one, that it holds one run only, and the metrics log's length.

A folder belongs to one run.  Its ``args.json`` (the flags plus a ``run_id``) is the first file a run
writes, so even a run killed before its first checkpoint is recognised; checkpoints carry the same
``run_id``.  :func:`claim_output_dir` decides, before anything is written, whether a run may use a folder:

* an empty folder (or one without run outputs): yes;
* ``--resume`` of a checkpoint of the run the folder holds (same run id, or, for checkpoints written
  before run ids, the checkpoint's own folder): yes, the run continues there;
* a fresh run over a run that stopped before its first checkpoint, with the same flags: it restarts
  (nothing to resume; the old metrics go, the log keeps both attempts);
* anything else (a fresh run over a run with a checkpoint or with other flags, ``--resume`` of another
  run's checkpoint): refused with a message naming the alternatives, unless ``--overwrite``, which first
  deletes every output of the old run (:data:`RUN_OUTPUT_FILES`, :data:`RUN_OUTPUT_DIRS`).

Temporary files of interrupted atomic writes (``.<name>.<12 hex digits>.tmp``, as large as a checkpoint)
are removed whenever a run starts or resumes in a folder.  A resumed run may continue in its checkpoint's
folder; metrics logged after the checkpoint it resumes from were written by steps it will redo, so
:func:`truncate_metrics_log` drops them.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import utils
from inference import run_directory
from tracking import COMET_OFFLINE_DIR, TENSORBOARD_DIR
from training.resume import changed_args

# What runs, validate.py, cirr_test_submission.py and the report write into a run folder (--overwrite deletes them).
RUN_OUTPUT_FILES = (
    "args.json", "args_resume_step*.json", "log.txt", "metrics.jsonl", "summary.json", "bad_samples*.json",
    "validation.json", "validation_*_grid.png", "validation_*_grid.html", "report.md", "curves.png",
)
RUN_OUTPUT_DIRS = ("checkpoints", "feature_cache", "submission", "validation", TENSORBOARD_DIR, COMET_OFFLINE_DIR)
# utils.atomic_write_bytes / checkpoint.atomic_link_or_copy temporary files.
_TEMPORARY_FILE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


class RunFolderError(utils.UserError, FileExistsError):
    """The output folder holds another run (or outputs of one) that this run may not mix with or replace."""


@dataclass
class PreviousRun:
    """What a folder holds of an earlier run."""

    path: Path
    outputs: list[Path]  # run outputs present (files and folders of RUN_OUTPUT_FILES / RUN_OUTPUT_DIRS)
    run_id: str | None  # from args.json; None for folders of runs written before run ids
    args: dict[str, Any] | None  # args.json without run_id; None if there is none

    @property
    def last_checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    def describe(self) -> str:
        run = f"run {self.run_id}" if self.run_id else "a previous run"
        shown = ", ".join(p.name for p in self.outputs[:4]) + (", ..." if len(self.outputs) > 4 else "")
        return f"{run} ({shown})"


def output_directory(args: argparse.Namespace, dataset: str) -> Path:
    """``--output_dir``; else the run folder of ``--resume``; else ``runs/<dataset>_<timestamp>``."""
    if args.output_dir:
        return Path(args.output_dir)
    if args.resume:
        return run_directory(args.resume)
    return Path(f"runs/{dataset}_{datetime.now():%Y%m%d_%H%M%S}")


def new_run_id() -> str:
    return uuid.uuid4().hex


def _run_outputs(folder: Path) -> list[Path]:
    files = {path for pattern in RUN_OUTPUT_FILES for path in folder.glob(pattern) if path.is_file()}
    folders = {folder / name for name in RUN_OUTPUT_DIRS if (folder / name).is_dir() and any((folder / name).iterdir())}
    return sorted(files | folders)


def previous_run(folder: Path) -> PreviousRun | None:
    """The run a folder holds, or None when it holds no run outputs."""
    outputs = _run_outputs(folder)
    if not outputs:
        return None
    args_file = folder / "args.json"
    recorded = None
    if args_file.is_file():
        try:
            recorded = json.loads(args_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise RunFolderError(f"{folder} holds a previous run whose args.json is unreadable ({error}): "
                                 "--overwrite to replace it, or another --output_dir") from error
    run_id = recorded.pop("run_id", None) if isinstance(recorded, dict) else None
    return PreviousRun(folder, outputs, run_id, recorded if isinstance(recorded, dict) else None)


def remove_run_outputs(folder: Path, keep: tuple[str, ...] = ()) -> list[Path]:
    """Delete every output of a run in ``folder`` (files and folders), except the names in ``keep``."""
    removed = []
    for path in _run_outputs(folder):
        if path.name in keep:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed


def remove_orphaned_temporary_files(folder: Path) -> list[tuple[Path, int]]:
    """Delete the temporary files interrupted atomic writes left in ``folder`` and ``folder/checkpoints``;
    returns each with its size in bytes."""
    removed = []
    for directory in (folder, folder / "checkpoints"):
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            if _TEMPORARY_FILE.match(path.name) and path.is_file():
                size = path.stat().st_size
                path.unlink()
                removed.append((path, size))
    return removed


def _write_args(folder: Path, run_id: str, args: argparse.Namespace) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    utils.atomic_write_json(folder / "args.json", {"run_id": run_id, **utils.public_args(vars(args))})


def claim_output_dir(output_dir: Path, args: argparse.Namespace, resume_run_id: str | None = None) -> tuple[str, list[str]]:
    """Decide whether this run may use ``output_dir`` (module docstring), before writing anything else there.

    Writes ``args.json`` with the run id when the folder has none (a fresh run, a restart, a run continued
    in a new folder), removes what ``--overwrite`` replaces and orphaned temporary files.

    Args:
        resume_run_id: the run id of the ``--resume`` checkpoint (None without ``--resume`` or for a
            checkpoint written before run ids).

    Returns:
        The run id, and what was done (lines for the run log, which is not open yet).

    Raises:
        RunFolderError: the folder holds another run, or outputs of one.
    """
    previous = previous_run(output_dir)
    notes: list[str] = []
    if previous is not None and args.overwrite:
        if args.resume and output_dir.resolve() in Path(args.resume).resolve().parents:
            raise RunFolderError(
                f"--overwrite would delete {args.resume}, the checkpoint to resume from: leave out --overwrite to "
                f"continue the run in {output_dir}, or resume into another --output_dir")
        removed = remove_run_outputs(output_dir)
        notes.append(f"--overwrite: deleted {previous.describe()} from {output_dir}: "
                     + ", ".join(path.name for path in removed))
        previous = None
    if args.resume:
        run_id = _claim_for_resume(output_dir, args, resume_run_id, previous, notes)
    else:
        run_id = _claim_for_fresh_run(output_dir, args, previous, notes)
    orphans = remove_orphaned_temporary_files(output_dir)
    if orphans:
        notes.append(f"removed {len(orphans)} temporary file(s) of interrupted writes "
                     f"({sum(size for _, size in orphans) / 2**20:.1f} MiB): " + ", ".join(str(p) for p, _ in orphans))
    return run_id, notes


def _claim_for_resume(output_dir: Path, args: argparse.Namespace, resume_run_id: str | None,
                      previous: PreviousRun | None, notes: list[str]) -> str:
    own_folder = run_directory(args.resume).resolve() == output_dir.resolve()
    if previous is None:
        run_id = resume_run_id or new_run_id()
        _write_args(output_dir, run_id, args)
        if not own_folder:
            notes.append(f"continuing run {run_id} of {run_directory(args.resume)} in {output_dir}")
        return run_id
    if previous.run_id is not None and resume_run_id is not None:
        same_run = previous.run_id == resume_run_id
    else:  # a folder or checkpoint from before run ids: only the checkpoint's own folder is known to be its run's
        same_run = own_folder
    if not same_run:
        raise RunFolderError(
            f"{output_dir} holds {previous.describe()}, not the run of {args.resume} (run {resume_run_id or '?'} of "
            f"{run_directory(args.resume)}): leave out --output_dir to continue that run in its own folder, give an "
            f"empty --output_dir, or add --overwrite to replace the run in {output_dir}")
    run_id = previous.run_id or resume_run_id or new_run_id()
    if not (output_dir / "args.json").is_file():
        _write_args(output_dir, run_id, args)
    return run_id


def _claim_for_fresh_run(output_dir: Path, args: argparse.Namespace, previous: PreviousRun | None,
                         notes: list[str]) -> str:
    if previous is None:
        run_id = new_run_id()
        _write_args(output_dir, run_id, args)
        return run_id
    if previous.last_checkpoint.is_file():
        raise RunFolderError(
            f"{output_dir} holds {previous.describe()}: pass --resume {previous.last_checkpoint} to continue it, "
            f"--overwrite to replace it, or another --output_dir")
    if previous.args is None:
        raise RunFolderError(
            f"{output_dir} holds outputs of another run ({previous.describe()}) without its args.json: --overwrite "
            f"to replace them, or another --output_dir")
    changed = changed_args(previous.args, args)
    if changed:
        raise RunFolderError(
            f"{output_dir} holds {previous.describe()}, which stopped before its first checkpoint and was started "
            f"with other flags ({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}): --overwrite to "
            f"replace it, or another --output_dir")
    # The same run, stopped before it wrote anything to resume from: it starts again (the log keeps both attempts).
    run_id = previous.run_id or new_run_id()
    removed = remove_run_outputs(output_dir, keep=("log.txt",))
    _write_args(output_dir, run_id, args)
    notes.append(f"restarting run {run_id} in {output_dir}: its previous attempt stopped before its first "
                 f"checkpoint (deleted: {', '.join(path.name for path in removed)})")
    return run_id


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
