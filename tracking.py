"""Experiment tracking: one small :class:`Tracker` interface, with comet_ml, TensorBoard and no-op implementations.

Training (:mod:`training.main`) gives its tracker the run's parameters once, every metric it writes to
``metrics.jsonl`` (per-step loss, per-epoch figures, per-validation metrics; through
:class:`utils.MetricsLogger`), and its pictures: the retrieval grid of each validation and the training
curves at the end.

* ``--tensorboard``: event files in ``<run>/tensorboard`` (``tensorboard --logdir <run>/tensorboard``).
* comet_ml online: ``--api_key`` and ``--workspace`` (``--project_name``).
* comet_ml offline: ``--comet_offline``: an archive ``<run>/comet/<id>.zip``, no network; ``comet upload
  <zip>`` sends it later.

The API key is never logged: parameters go through :func:`utils.public_args`, and comet_ml's own
collection of the environment (which records the command line, API key included), source code and git
patch is switched off.  comet_ml and TensorBoard are imported only when asked for.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import utils

__all__ = ["Tracker", "CometTracker", "TensorBoardTracker", "TrackerGroup", "create_tracker",
           "TENSORBOARD_DIR", "COMET_OFFLINE_DIR"]

_logger = logging.getLogger("cir.tracking")

TENSORBOARD_DIR = "tensorboard"
COMET_OFFLINE_DIR = "comet"
# comet_ml collects these by default; off: the command line (in the environment details) may hold the API key,
# and the parameters, metrics and pictures are logged explicitly.
_COMET_QUIET = dict(log_code=False, log_graph=False, auto_param_logging=False, auto_metric_logging=False,
                    parse_args=False, auto_output_logging=False, log_env_details=False, log_git_metadata=False,
                    log_git_patch=False, display_summary_level=0)


class Tracker:
    """What a run reports to an experiment tracker.  This base class is the 'none' tracker: it drops
    everything."""

    name = "none"

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The run's settings (secrets removed by the caller or here)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, epoch: int | None = None) -> None:
        """Scalars at a training step (the global optimisation step) and epoch."""

    def log_image(self, path: str | os.PathLike, name: str, step: int | None = None) -> None:
        """A picture already written to ``path`` (PNG), under ``name``."""

    def close(self) -> None:
        """Flush and end the experiment (idempotent)."""

    def __bool__(self) -> bool:
        return self.name != "none"


class CometTracker(Tracker):
    """comet_ml: online (``api_key`` + ``workspace``) or offline (``offline_dir``: a zip archive, no network)."""

    name = "comet"

    def __init__(self, project_name: str | None, workspace: str | None = None, api_key: str | None = None,
                 offline_dir: str | os.PathLike | None = None) -> None:
        try:
            import comet_ml
        except ImportError as exc:
            raise utils.UserError("comet_ml logging was requested but comet_ml is not installed: "
                                  "pip install comet_ml") from exc
        if offline_dir is not None:
            Path(offline_dir).mkdir(parents=True, exist_ok=True)
            self.experiment = comet_ml.OfflineExperiment(project_name=project_name, workspace=workspace,
                                                         offline_directory=str(offline_dir), **_COMET_QUIET)
        else:
            self.experiment = comet_ml.Experiment(api_key=api_key, workspace=workspace, project_name=project_name,
                                                  **_COMET_QUIET)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.experiment.log_parameters(utils.public_args(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, epoch: int | None = None) -> None:
        self.experiment.log_metrics(dict(metrics), step=step, epoch=epoch)

    def log_image(self, path: str | os.PathLike, name: str, step: int | None = None) -> None:
        self.experiment.log_image(str(path), name=name, step=step)

    def close(self) -> None:
        if self.experiment is not None:
            self.experiment.end()
            self.experiment = None


class TensorBoardTracker(Tracker):
    """TensorBoard event files in ``log_dir`` (torch.utils.tensorboard; needs the ``tensorboard`` package)."""

    name = "tensorboard"

    def __init__(self, log_dir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise utils.UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_params(self, params: Mapping[str, Any]) -> None:
        rows = "\n".join(f"| {key} | {value} |" for key, value in sorted(utils.public_args(params).items()))
        self.writer.add_text("params", f"| parameter | value |\n|---|---|\n{rows}")

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, epoch: int | None = None) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), global_step=step)
        self.writer.flush()

    def log_image(self, path: str | os.PathLike, name: str, step: int | None = None) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # [H, W, 3] uint8
        self.writer.add_image(name, pixels, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class TrackerGroup(Tracker):
    """Several trackers at once (e.g. TensorBoard and comet_ml): every call goes to each."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)
        self.name = "+".join(t.name for t in self.trackers) or "none"

    def log_params(self, params: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, epoch: int | None = None) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step, epoch)

    def log_image(self, path: str | os.PathLike, name: str, step: int | None = None) -> None:
        for tracker in self.trackers:
            tracker.log_image(path, name, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def create_tracker(
    output_dir: str | os.PathLike, tensorboard: bool = False, comet_offline: bool = False,
    api_key: str | None = None, workspace: str | None = None, project_name: str | None = None,
) -> Tracker:
    """The trackers a run's flags ask for (none: a :class:`Tracker` that drops everything).

    comet_ml goes online with both ``api_key`` and ``workspace``, offline into ``<output_dir>/comet`` with
    ``comet_offline``; an API key without a workspace (or the reverse) is a warning, not a run stopper.
    """
    output_dir = Path(output_dir)
    trackers: list[Tracker] = []
    if tensorboard:
        trackers.append(TensorBoardTracker(output_dir / TENSORBOARD_DIR))
    if comet_offline:
        trackers.append(CometTracker(project_name, workspace, offline_dir=output_dir / COMET_OFFLINE_DIR))
    elif api_key and workspace:
        trackers.append(CometTracker(project_name, workspace, api_key=api_key))
    elif api_key or workspace:
        _logger.warning("comet_ml logging needs both --api_key and --workspace (or --comet_offline); not logging to it")
    for tracker in trackers:
        _logger.info("tracking with %s%s", tracker.name,
                     f" in {tracker.log_dir}" if isinstance(tracker, TensorBoardTracker) else "")
    if not trackers:
        return Tracker()
    return trackers[0] if len(trackers) == 1 else TrackerGroup(trackers)
