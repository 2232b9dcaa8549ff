"""What keeps a long run alive or stops it cleanly: pre-emption signals, unreadable samples, non-finite
losses, and deterministic kernels for bit-exact resumes (docs/fault_tolerance.md)."""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Sequence

import torch

import utils
from data_utils import SkippedSample

_logger = logging.getLogger("cir")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients stayed non-finite for ``--max_nonfinite_steps`` consecutive steps."""


class BadSampleLog:
    """Training samples skipped under ``--skip_bad_samples``: each is logged, counted and listed in a JSON file.

    The file (``{"count": n, "samples": [{"epoch", "step", "index", "error"}, ...]}``) is rewritten
    atomically whenever a sample is skipped, so it is complete even if the run is killed.
    """

    def __init__(self, path: Path, records: list[dict[str, Any]]) -> None:
        """``records``: the list to extend, normally ``TrainState.bad_samples`` so checkpoints carry it."""
        self.path = path
        self.records = records

    def add(self, skipped: Sequence[SkippedSample], epoch: int, step: int) -> None:
        for sample in skipped:
            _logger.warning("skipping training sample %d (epoch %d, step %d): %s", sample.index, epoch + 1, step, sample.error)
            self.records.append({"epoch": epoch, "step": step, "index": sample.index, "error": sample.error})
        self.write()

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


def enable_determinism(device: torch.device) -> None:
    """Deterministic kernels (errors for ops that have none); on CUDA also cuDNN and cuBLAS settings."""
    if device.type == "cuda":
        # cuBLAS needs a fixed workspace for deterministic results; it is read when cuBLAS initialises.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)
