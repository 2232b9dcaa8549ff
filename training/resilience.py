"""What keeps a long run alive or stops it cleanly: pre-emption signals, unreadable samples (up to a limit),
non-finite losses, runs that never step, the fatal error in the run log, and deterministic kernels for
bit-exact resumes (docs/fault_tolerance.md)."""
from __future__ import annotations

import logging
import os
import signal
import threading
import traceback
from pathlib import Path
from types import FrameType
from typing import Any, Sequence

import torch

import utils
from data_utils import DataError, SkippedSample
from training.params import MAX_BAD_SAMPLE_FRACTION  # the flag's default (issue 15: defined with the parser)

_logger = logging.getLogger("cir")


class NonFiniteLossError(utils.UserError, RuntimeError):
    """The loss or the gradients stayed non-finite for ``--max_nonfinite_steps`` consecutive steps."""


class TooManyBadSamplesError(DataError):
    """More distinct training samples were unreadable than ``--max_bad_sample_fraction`` allows."""


class NoOptimizerStepError(utils.UserError, RuntimeError):
    """A run ended without one step that updated the weights: it trained nothing and is not reported as finished."""


class BadSampleLog:
    """Training samples skipped under ``--skip_bad_samples``: each is logged, counted and listed in a JSON file.

    The file (``{"count": n, "samples": [{"epoch", "step", "index", "error"}, ...]}``) is rewritten
    atomically whenever a sample is skipped, so it is complete even if the run is killed.  Once more than
    ``max_fraction`` of the ``num_samples`` training samples (distinct indices, so the same sample skipped
    again next epoch counts once) have been unreadable, :meth:`add` raises :class:`TooManyBadSamplesError`.
    """

    def __init__(self, path: Path, records: list[dict[str, Any]], num_samples: int,
                 max_fraction: float = MAX_BAD_SAMPLE_FRACTION) -> None:
        """``records``: the list to extend, normally ``TrainState.bad_samples`` so checkpoints carry it."""
        self.path = path
        self.records = records
        self.num_samples = num_samples
        self.max_fraction = max_fraction

    def add(self, skipped: Sequence[SkippedSample], epoch: int, step: int) -> None:
        for sample in skipped:
            _logger.warning("skipping training sample %d (epoch %d, step %d): %s", sample.index, epoch + 1, step, sample.error)
            self.records.append({"epoch": epoch, "step": step, "index": sample.index, "error": sample.error})
        self.write()
        bad = len({record["index"] for record in self.records})
        if bad > self.max_fraction * self.num_samples:
            raise TooManyBadSamplesError(
                f"{bad} of the {self.num_samples} training samples ({100 * bad / self.num_samples:.1f} %) are "
                f"unreadable, more than --max_bad_sample_fraction {self.max_fraction} allows: the data looks broken "
                f"(is --data_root right?). They are listed in {self.path}; the last: {self.records[-1]['error']}")

    def write(self) -> None:
        utils.atomic_write_json(self.path, {"count": len(self.records), "samples": self.records})


class PreemptionHandler:
    """Turn SIGTERM (and SIGINT) into a request to checkpoint at the next step boundary and stop.

    A context manager: the handlers are installed on entry and the previous ones restored on exit.
    After the first signal the previous handler is put back, so a second Ctrl-C (KeyboardInterrupt)
    or SIGTERM (terminate) acts at once.  Outside the main thread, where Python cannot install signal
    handlers, nothing is installed and a warning is logged.
    """

    def __init__(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        signal.signal(signum, self._previous[self.received])

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            _logger.warning("training outside the main thread: %s will not checkpoint before stopping",
                            ", ".join(sig.name for sig in self.signals))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def log_fatal(logger: logging.Logger, error: BaseException) -> None:
    """Record the error that ends a run in the run's log files (``log.txt``); the console gets it from the
    script's exit (:func:`utils.run_cli`).  User errors as their message, anything else with its traceback."""
    exc_info = None
    if isinstance(error, KeyboardInterrupt):
        message = "stopped: interrupted (KeyboardInterrupt)"
    elif isinstance(error, (utils.UserError, OSError)):
        message = f"stopped by an error: {error}"
    else:
        message = f"stopped by an unexpected error: {type(error).__name__}: {error}"
        exc_info = (type(error), error, error.__traceback__)
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None, exc_info)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def release_frames(error: BaseException) -> None:
    """Clear the local variables of the frames in ``error``'s tracebacks (its causes' and contexts' too).

    They hold the training DataLoader's iterator; released, its workers shut down.  Kept (a traceback lives
    until the interpreter exits), the workers, which ignore SIGTERM (``training.sampler.train_worker_init``),
    outlive the error, and the interpreter waits for them at exit for ever.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def enable_determinism(device: torch.device) -> None:
    """Deterministic kernels (errors for ops that have none); on CUDA also cuDNN and cuBLAS settings."""
    if device.type == "cuda":
        # cuBLAS needs a fixed workspace for deterministic results; it is read when cuBLAS initialises.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)
