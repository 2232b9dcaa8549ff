"""General helpers with no knowledge of datasets or models: user errors and the scripts' exit, atomic writes,
logging, seeding, run arguments, allocator tuning and the metrics log.

Retrieval, metrics, submissions and checkpoints have their own modules (:mod:`retrieval`, :mod:`metrics`,
:mod:`submission`, :mod:`checkpoint`).
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import random
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

# numpy, pandas and torch are imported where used: every script imports this module, and `--help` should
# not wait seconds for torch.

__all__ = [
    "UserError",
    "UsageError",
    "run_cli",
    "atomic_write_bytes",
    "fsync_directory",
    "atomic_write_json",
    "tune_cpu_allocator",
    "MALLOC_ENV_SETTINGS",
    "SECRET_ARGS",
    "public_args",
    "set_seed",
    "seed_worker",
    "setup_logging",
    "progress",
    "PROGRESS_INTERVAL_S",
    "MetricsLogger",
    "read_metrics_log",
]

_logger = logging.getLogger("cir.utils")


# --------------------------------------------------------------------------------------------------
# User errors and the scripts' exit
# --------------------------------------------------------------------------------------------------


class UserError(Exception):
    """A problem with what the user gave a script (data, files, checkpoints, flags, output folders).

    Error types of this project that describe bad input derive from it (``DataError``, ``CheckpointError``,
    ...).  :func:`run_cli` prints them as one line, without a traceback; every other exception is a
    programming error and keeps its traceback.
    """


class UsageError(UserError, ValueError):
    """A flag value (or combination) no run can start with."""


DEBUG_FLAG = "--debug"
DEBUG_ENV = "CIR_DEBUG"


def _error_line(error: BaseException) -> str:
    """The message of a user error; an OSError as "<what went wrong>: <file>" (never "[Errno 2] ...")."""
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
        if error.filename is not None and str(error.filename) not in text:
            text = f"{text}: {error.filename}"
        return text
    return str(error) or type(error).__name__


def run_cli(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None, prog: str | None = None) -> Any:
    """Run a script's ``main(argv)``; a user error ends it with one line on stderr and exit status 1.

    User errors are :class:`UserError` and OSError (a missing file, no permission, a full disk: the
    environment, not the code).  Any other exception is a programming error and propagates with its
    traceback.  ``--debug`` anywhere on the command line (removed before ``main`` sees it) or the
    environment variable ``CIR_DEBUG=1`` shows the traceback of user errors too.  Ctrl-C ends with status 130.

    Returns:
        What ``main`` returned.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    prog = prog or Path(sys.argv[0]).name
    try:
        return main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (UserError, OSError) as error:
        if debug:
            raise
        print(f"{prog}: error: {_error_line(error)}", file=sys.stderr)
        raise SystemExit(1) from None


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def fsync_directory(directory: str | os.PathLike) -> None:
    """fsync a directory, so that a rename into it survives a power loss (POSIX; a no-op on Windows).

    A filesystem that cannot fsync directories (EINVAL / ENOTSUP, e.g. some network mounts) is skipped.
    """
    if os.name == "nt":  # directories cannot be opened there; NTFS journals the rename itself
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one.

    The bytes go to a temporary file ``.<name>.<12 hex digits>.tmp`` in the same directory (same
    filesystem, so ``os.replace`` is atomic), are flushed and fsynced, then renamed over ``path``, and the
    directory is fsynced so that the rename itself is durable. On failure (e.g. disk full) the temporary
    file is removed, ``path`` is left untouched and an OSError naming ``path`` is raised.  A process killed
    mid-write leaves its temporary file behind (training removes them when it starts).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    created = False
    try:
        # O_EXCL: never clobber another writer's temp file; mode 0o666 lets the umask apply as usual.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        created = True
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException as exc:
        if created:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            # OSError(errno, ...) re-creates the matching subclass (FileNotFoundError, ...).
            raise OSError(exc.errno or errno.EIO, f"could not write {path}: {exc.strerror or exc}") from exc
        raise


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` written with :func:`atomic_write_bytes` (the old file or the complete new one)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())  # a view: getvalue() would copy the whole file once more


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Atomically write ``obj`` as UTF-8 JSON (compact separators when ``indent`` is None)."""
    separators = (",", ":") if indent is None else None
    text = json.dumps(obj, indent=indent, separators=separators)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))


# --------------------------------------------------------------------------------------------------
# Seeding and logging
# --------------------------------------------------------------------------------------------------


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MALLOC_ENV_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed activation buffers instead of returning them to the kernel every step.

    With glibc's defaults, the large tensors of a CPU training step are mmap-ed and unmapped each step
    and page-faulted back in the next (measured: 7-10 % of a ViT-B/32 step).  A 32 MiB mmap threshold
    and a 2 GiB trim threshold (the largest mallopt accepts) keep them in the heap, as the environment
    variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` would.  Results are unchanged.
    Returns False (and changes nothing) off glibc, or when those variables are already set.
    """
    if any(key in os.environ for key in MALLOC_ENV_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


SECRET_ARGS = frozenset({"api_key"})


def public_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Run arguments without secrets (the comet_ml API key), as written to args.json, checkpoints and trackers."""
    return {key: value for key, value in args.items() if key not in SECRET_ARGS}


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all CUDA devices too, when present)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy only accepts 32-bit seeds
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python and NumPy from the worker's torch seed.

    torch already gives each worker seed base_seed + worker_id, but not Python's ``random`` or
    NumPy, which would otherwise repeat the same stream in every worker.
    """
    import numpy as np
    import torch

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def setup_logging(output_dir: Path | None, level: int = logging.INFO) -> logging.Logger:
    """Configure and return the ``cir`` logger: console, plus ``output_dir/log.txt`` when given.

    Calling it again replaces the handlers instead of duplicating them.
    """
    logger = logging.getLogger("cir")
    logger.setLevel(level)
    logger.propagate = False  # our handlers only; avoids double lines via the root logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "log.txt", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.setLevel(level)
        logger.addHandler(handler)
    return logger


def _to_float(value: Any) -> float:
    """Python float from a number, 0-d tensor or NumPy scalar (JSON cannot hold tensors)."""
    return float(value.item()) if hasattr(value, "item") else float(value)


class MetricsLogger:
    """Append metrics to ``output_dir/metrics.jsonl`` and pass them on to an experiment tracker.

    Each :meth:`log` call writes one JSON object ``{"time", ["step"], ["epoch"], <prefix+name>: value}``
    and flushes it, so the file is readable while training runs.  ``tracker`` (a :class:`tracking.Tracker`:
    comet_ml, TensorBoard) gets the same values through ``log_metrics(values, step=, epoch=)``; its owner
    closes it.
    """

    def __init__(self, output_dir: Path, tracker: Any = None):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / "metrics.jsonl"
        self.tracker = tracker
        self._file = self.path.open("a", encoding="utf-8")

    def log(
        self, metrics: Mapping[str, float], step: int | None = None, epoch: int | None = None, prefix: str = ""
    ) -> None:
        """Record ``metrics`` (names get ``prefix`` prepended) at the given step / epoch."""
        values = {f"{prefix}{name}": _to_float(value) for name, value in metrics.items()}
        record: dict[str, Any] = {"time": time.time()}
        if step is not None:
            record["step"] = int(step)
        if epoch is not None:
            record["epoch"] = int(epoch)
        record.update(values)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tracker is not None:
            self.tracker.log_metrics(values, step=step, epoch=epoch)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_metrics_log(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``metrics.jsonl`` written by :class:`MetricsLogger` into a DataFrame (one row per call).

    A truncated last line (the process died mid-write) is skipped with a warning; a malformed line
    elsewhere raises ValueError.
    """
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                _logger.warning("%s: skipping truncated last line %d", path, number)
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({exc})") from exc
    import pandas as pd

    return pd.DataFrame.from_records(records)


# --------------------------------------------------------------------------------------------------
# Progress of long loops (issue 15): a bar on a terminal, a log line now and then otherwise
# --------------------------------------------------------------------------------------------------

PROGRESS_INTERVAL_S = 30.0
_progress_logger = logging.getLogger("cir.progress")


class Progress:
    """Iterate ``iterable`` and show how far it got: a tqdm bar when ``file`` is a terminal, else one INFO
    line (logger ``cir.progress``) every ``interval`` seconds.

    A bar redrawn with carriage returns is unreadable once redirected to a file (every redraw stays in the
    log), so without a terminal the loop reports like a log: ``epoch 2/8: 120/250 (48%), 61 s, ~66 s left,
    loss=0.4213``, and a closing ``done`` line if it reported anything.  A loop shorter than ``interval``
    writes nothing.  :meth:`set_postfix` adds fields to the bar and to the next line.
    """

    def __init__(
        self,
        iterable: Any,
        desc: str,
        total: int | None = None,
        initial: int = 0,
        interval: float = PROGRESS_INTERVAL_S,
        file: Any = None,
    ) -> None:
        self.iterable, self.desc, self.initial, self.interval = iterable, desc, initial, interval
        if total is None and hasattr(iterable, "__len__"):
            total = initial + len(iterable)
        self.total = total
        self.file = sys.stderr if file is None else file
        isatty = getattr(self.file, "isatty", None)
        self.bar = None
        if isatty is not None and isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, file=self.file)
        self.postfix: dict[str, Any] = {}

    def set_postfix(self, **fields: Any) -> None:
        """Show ``fields`` (e.g. ``loss="0.4213"``) beside the count."""
        self.postfix = fields
        if self.bar is not None:
            self.bar.set_postfix(**fields)

    def _line(self, count: int, start: float) -> str:
        elapsed = time.monotonic() - start
        done = count - self.initial
        parts = [f"{count}/{self.total}" if self.total else str(count)]
        if self.total:
            parts[0] += f" ({100 * count / self.total:.0f}%)"
        parts.append(f"{elapsed:.0f} s")
        if self.total and done > 0:
            parts.append(f"~{elapsed / done * (self.total - count):.0f} s left")
        parts += [f"{key}={value}" for key, value in self.postfix.items()]
        return f"{self.desc}: {', '.join(parts)}"

    def __iter__(self) -> Any:
        start = last = time.monotonic()
        count, reported = self.initial, False
        try:
            for item in self.iterable:
                yield item
                count += 1
                if self.bar is not None:
                    self.bar.update(1)
                elif time.monotonic() - last >= self.interval:
                    _progress_logger.info(self._line(count, start))
                    last, reported = time.monotonic(), True
        finally:
            if self.bar is not None:
                self.bar.close()
            elif reported:
                _progress_logger.info("%s: done, %d in %.0f s", self.desc, count - self.initial, time.monotonic() - start)

    def __len__(self) -> int:
        return len(self.iterable)


def progress(
    iterable: Any, desc: str, total: int | None = None, initial: int = 0, interval: float = PROGRESS_INTERVAL_S,
) -> Progress:
    """The one progress display of every long loop (:class:`Progress`): a bar on a terminal, else a log line
    every ``interval`` seconds; ``initial`` items were done before (a resumed epoch)."""
    return Progress(iterable, desc, total=total, initial=initial, interval=interval)
