"""One training loop and one evaluation for CIRR and FashionIQ (open_clip ``train.py`` style).

``train_cirr.py`` and ``train_fiq.py`` are argparse front ends over :func:`run_training`;
``validate.py`` and ``cirr_test_submission.py`` reuse :func:`encode_gallery` / :func:`encode_queries`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import platform
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import utils
from data_utils import (
    TRANSFORM_REVISION, CIRRDataset, DataError, FashionIQDataset, SkipBadSamples, SkippedSample, build_transform,
    collate_batch,
)
from distributed import (
    DistributedEnv, all_gather_with_grad, any_rank, barrier, cleanup_distributed, init_distributed, unwrap_model, wrap_model,
)
from model import (
    CheckpointMismatchError, SSNModel, build_ssn_model, check_model_config, parse_pretrained, ssn_loss_terms,
    ssn_model_from_checkpoint,
)
from model.ssn_model import check_state_dict
from precision import EVAL_PRECISION_HELP, PRECISIONS, autocast, effective_precision, grad_scaler
from viz.report import write_run_report_safely

FIQ_CATEGORIES = ("dress", "shirt", "toptee")
_logger = logging.getLogger("cir")


# ---------------------------------------------------------------------------------------------- data
def resolve_dataset_root(data_root: str | os.PathLike, dataset: str) -> Path:
    """Accept the dataset folder itself or its parent (``.../cirr_dataset`` or ``...``)."""
    root = Path(data_root).expanduser()
    marker, folder = {"cirr": ("cirr", "cirr_dataset"), "fashioniq": ("captions", "fashion-iq"),
                      "circo": ("annotations", "CIRCO")}[dataset]
    for candidate in (root, root / folder):
        if (candidate / marker).is_dir():
            return candidate
    raise FileNotFoundError(
        f"--data_root {root}: no {dataset} dataset there (expected {root}/{marker}/ or {root}/{folder}/{marker}/)"
    )


@dataclass
class RetrievalSet:
    """Queries and the gallery they are ranked against (one per FashionIQ category)."""

    name: str
    queries: Dataset
    gallery: Dataset


def retrieval_sets(
    dataset: str, root: Path, split: str, transform: Any, dress_types: Sequence[str] = FIQ_CATEGORIES
) -> list[RetrievalSet]:
    """The query / gallery pairs of a split: one for CIRR, one per FashionIQ category."""
    if dataset == "cirr":
        return [RetrievalSet("cirr", CIRRDataset(root, split, "relative", transform), CIRRDataset(root, split, "classic", transform))]
    return [
        RetrievalSet(
            category,
            FashionIQDataset(root, split, [category], "relative", transform),
            FashionIQDataset(root, split, [category], "classic", transform),
        )
        for category in dress_types
    ]


def make_loader(
    dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, drop_last: bool = False, generator: torch.Generator | None = None, sampler: Sampler[int] | None = None,
    worker_init_fn: Callable[[int], None] = utils.seed_worker,
) -> DataLoader:
    """A DataLoader over triplets or images with pinned host memory on CUDA (asynchronous copies).

    Workers are never persistent: the training loader's workers are re-created every epoch so that
    they are seeded from the epoch's ``loader_seed`` (exact resume of FashionIQ's random caption order
    depends on it), and the evaluation loaders are built once per use.  Re-creating 2-4 workers costs
    well under a second per epoch (docs/benchmark.md).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        collate_fn=collate_batch,
        worker_init_fn=worker_init_fn,
        generator=generator,
    )


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch permutation of a dataset, sharded over replicas, that can start mid-epoch.

    Epoch ``e`` visits ``randperm(num_samples)`` drawn from a generator seeded with ``seed + e``, so
    the order of an epoch depends only on the seed and the epoch, never on resumes.  The permutation is
    cut into global batches of ``num_replicas · batch_size`` (the tail is dropped) and rank ``r`` takes
    the ``r``-th block of ``batch_size`` of each: the ranks' batches gathered in rank order are exactly
    the batches one process with ``num_replicas · batch_size`` would see, and every rank runs the same
    number of steps.
    :meth:`set_epoch` with ``start_step`` skips the batches an interrupted run already trained on.

    Args:
        num_samples: length of the dataset.
        batch_size: per-rank batch size (the DataLoader's).
        seed: base seed of the permutations.
        num_replicas, rank: data-parallel world size and this process's rank.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per rank and epoch."""
        return self.num_samples // self.num_replicas // self.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from its batch ``start_step`` on (0 = the whole epoch)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is not in [0, {self.steps_per_epoch}]")
        self.epoch, self.start_step = epoch, start_step

    def epoch_indices(self) -> list[int]:
        """This rank's indices for the whole current epoch, in visiting order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        steps = self.steps_per_epoch
        global_batches = order[: steps * self.num_replicas * self.batch_size].view(steps, self.num_replicas, self.batch_size)
        return global_batches[:, self.rank].reshape(-1).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start_step * self.batch_size :])

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_size

    def state_dict(self) -> dict[str, int]:
        """Where the sampler stands (stored in checkpoints, checked on resume)."""
        return {"seed": self.seed, "num_samples": self.num_samples, "batch_size": self.batch_size,
                "num_replicas": self.num_replicas, "epoch": self.epoch, "start_step": self.start_step}


def loader_seed(seed: int, epoch: int, step: int) -> int:
    """Seed of the training DataLoader's generator for an epoch entered at batch ``step``.

    The generator only seeds DataLoader workers (the order comes from :class:`ResumableSampler`), so
    worker randomness is a function of (seed, epoch, step) and not of when the process started.
    """
    return int(np.random.SeedSequence([seed, epoch, step]).generate_state(1)[0])


def train_worker_init(worker_id: int) -> None:
    """Training DataLoader workers: seed as :func:`utils.seed_worker` and ignore SIGINT / SIGTERM.

    Ctrl-C and schedulers signal the whole process group; the main process turns the signal into a
    checkpoint at the next step (see :class:`PreemptionHandler`), which needs the workers alive until
    it shuts them down.  Workers still exit when the main process dies (DataLoader's watchdog).
    """
    utils.seed_worker(worker_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def encode_gallery(
    model: SSNModel, gallery: Dataset, device: torch.device, precision: str = "fp32", method: str = "ssn",
    batch_size: int = 64, num_workers: int = 0,
) -> tuple[list[str], torch.Tensor]:
    """Names and normalised features [G, D] of every gallery image."""
    model.eval()
    names: list[str] = []
    features = []
    for batch in tqdm(make_loader(gallery, batch_size, num_workers, device), desc="gallery", leave=False):
        with autocast(precision, device):
            features.append(model.encode_gallery(batch["image"].to(device, non_blocking=True), method).float().cpu())
        names.extend(batch["name"])
    return names, torch.cat(features)


@torch.no_grad()
def encode_queries(
    model: SSNModel, queries: Dataset, device: torch.device, precision: str = "fp32", method: str = "ssn",
    batch_size: int = 64, num_workers: int = 0,
) -> tuple[torch.Tensor, dict[str, list]]:
    """Normalised query features [Q, D] and the queries' metadata (names, captions, members, ...)."""
    model.eval()
    features = []
    metadata: dict[str, list] = {}
    for batch in tqdm(make_loader(queries, batch_size, num_workers, device), desc="queries", leave=False):
        token_ids = model.backbone.tokenize(batch["caption"]).to(device)
        with autocast(precision, device):
            features.append(
                model.encode_query(batch["reference_image"].to(device, non_blocking=True), token_ids, method).float().cpu()
            )
        for key, value in batch.items():
            if key != "reference_image":
                metadata.setdefault(key, []).extend(value)
    return torch.cat(features), metadata


GalleryEncoder = Callable[[RetrievalSet, str, Callable[[], tuple[list[str], torch.Tensor]]], tuple[list[str], torch.Tensor]]
FeatureCallback = Callable[[RetrievalSet, list[str], torch.Tensor, torch.Tensor, dict[str, list]], None]


def evaluate(
    model: SSNModel, sets: Sequence[RetrievalSet], dataset: str, device: torch.device, precision: str = "fp32",
    method: str = "ssn", batch_size: int = 64, num_workers: int = 0,
    gallery_encoder: GalleryEncoder | None = None, on_features: FeatureCallback | None = None,
) -> dict[str, float]:
    """Validation recalls: CIRR R@k / Rs@k / Avg, or FashionIQ R@10 / R@50 per category and averaged.

    ``gallery_encoder(set, method, compute)`` may replace the gallery encoding (e.g. by a feature cache
    that calls ``compute`` on a miss); ``on_features(set, names, gallery [G, D], queries [Q, D], meta)``
    sees each set's features after ranking (e.g. to draw retrieval examples from them).
    """
    per_set = {}
    for retrieval_set in sets:
        def compute() -> tuple[list[str], torch.Tensor]:
            return encode_gallery(model, retrieval_set.gallery, device, precision, method, batch_size, num_workers)

        names, gallery = gallery_encoder(retrieval_set, method, compute) if gallery_encoder else compute()
        queries, meta = encode_queries(model, retrieval_set.queries, device, precision, method, batch_size, num_workers)
        if dataset == "cirr":
            per_set[retrieval_set.name] = utils.cirr_metrics(
                queries, gallery, names, meta["reference_name"], meta["target_name"], meta["members"]
            )
        else:
            per_set[retrieval_set.name] = utils.fiq_metrics(queries, gallery, names, meta["target_name"])
        if on_features is not None:
            on_features(retrieval_set, names, gallery, queries, meta)
    return per_set["cirr"] if dataset == "cirr" else utils.summarize_fiq(per_set)


# ---------------------------------------------------------------------------------------------- training
@dataclass
class TrainState:
    """Progress of a run; everything here goes into checkpoints."""

    epoch: int = 0  # epochs completed
    global_step: int = 0  # batches consumed over the run (skipped steps included)
    step_in_epoch: int = 0  # batches of the current epoch consumed
    epoch_loss_sum: float = 0.0  # sum over the current epoch's trained triplets of their loss
    epoch_samples: int = 0  # triplets trained on in the current epoch
    # Per checkpoint-selection criterion (utils.SELECTION_CRITERIA): {"value", "epoch", "metrics"} of its best validation.
    best_by: dict[str, dict[str, Any]] = field(default_factory=dict)
    nonfinite_steps: int = 0  # consecutive steps with a non-finite loss or gradient
    amp_overflow_steps: int = 0  # fp16 AMP steps the GradScaler skipped for an overflow (over the run)
    bad_samples: list[dict[str, Any]] = field(default_factory=list)  # samples skipped (--skip_bad_samples)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> "TrainState":
        """The state saved by :func:`checkpoint_state` (format 1 checkpoints resume at an epoch start)."""
        return cls(
            epoch=checkpoint["epoch"],
            global_step=checkpoint["global_step"],
            step_in_epoch=checkpoint.get("step_in_epoch", 0),
            epoch_loss_sum=checkpoint.get("epoch_loss_sum", 0.0),
            epoch_samples=checkpoint.get("epoch_samples", 0),
            best_by=checkpoint.get("best_by", _legacy_best_by(checkpoint)),
            amp_overflow_steps=checkpoint.get("amp_overflow_steps", 0),
            bad_samples=list(checkpoint.get("bad_samples", [])),
        )

    def record_validation(self, metrics: dict[str, float], dataset: str) -> list[str]:
        """Keep the best value of each selection criterion; returns the criteria these metrics improved."""
        improved = []
        for criterion in utils.SELECTION_CRITERIA[dataset]:
            score = utils.best_metric(metrics, dataset, criterion)
            if score > self.best_by.get(criterion, {}).get("value", -math.inf):
                self.best_by[criterion] = {"value": score, "epoch": self.epoch, "metrics": dict(metrics)}
                improved.append(criterion)
        return improved

    def end_epoch(self) -> float:
        """Close the current epoch; returns its mean loss per trained triplet."""
        mean_loss = self.epoch_loss_sum / max(self.epoch_samples, 1)
        self.epoch += 1
        self.step_in_epoch, self.epoch_loss_sum, self.epoch_samples = 0, 0.0, 0
        return mean_loss


def _legacy_best_by(checkpoint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``best_by`` of a checkpoint written before it existed: the arithmetic mean's best, epoch unknown."""
    if not math.isfinite(checkpoint["best_metric"]):
        return {}
    return {"mean": {"value": checkpoint["best_metric"], "epoch": None, "metrics": checkpoint["best_metrics"]}}


# The official CIRR script keeps one best checkpoint per mean of the 7 recalls.
CIRR_BEST_CHECKPOINTS = {"mean": "best_mean.pt", "harmonic_mean": "best_harmonic.pt", "geometric_mean": "best_geometric.pt"}


def best_checkpoint_files(dataset: str, improved: Sequence[str], selection: str) -> list[str]:
    """The checkpoint files a validation replaces under ``--save_best``, given the criteria it ``improved``.

    CIRR keeps the official trio ``best_mean.pt``, ``best_harmonic.pt``, ``best_geometric.pt``; every
    dataset keeps ``best.pt``, the best by ``selection`` (``--best_metric``).
    """
    files = [CIRR_BEST_CHECKPOINTS[criterion] for criterion in improved] if dataset == "cirr" else []
    return files + ["best.pt"] if selection in improved else files


def validation_due(epoch: int, frequency: int, num_epochs: int) -> bool:
    """Whether to validate after the 0-based ``epoch`` of ``num_epochs``.

    As the official scripts: after epochs 0, f, 2f, ... (``epoch % f == 0``, so the first epoch is
    always validated).  In addition after the last epoch, so that every run ends with measured metrics
    (docs/deviations.md).
    """
    return epoch % frequency == 0 or epoch == num_epochs - 1


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


def _gradient_norm(model: nn.Module) -> torch.Tensor:
    """Total 2-norm of the gradients (non-finite if any gradient is)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def _train_step(
    model: nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    state: TrainState, device: torch.device, precision: str, kl_weight: float, grad_clip: float | None,
    max_nonfinite_steps: int,
) -> dict[str, torch.Tensor] | None:
    """One optimisation step; returns the loss terms, or None if the step was skipped as non-finite.

    fp32 and bf16: a non-finite loss or gradient norm skips the optimiser step and counts as a
    non-finite step.  fp16 AMP: the GradScaler skips steps whose scaled gradients overflowed and halves
    its scale; that is how it calibrates the scale (from 2^16, a few skips in a row at the start are
    normal), so such a step is only counted in ``state.amp_overflow_steps``.  A non-finite loss counts
    as non-finite, and so does an overflow at a scale of 1 or less, where the gradients themselves are
    not finite (otherwise the scaler would skip them silently for ever).  ``max_nonfinite_steps``
    non-finite steps in a row raise :class:`NonFiniteLossError`; skipped steps never update the weights
    or the optimiser state.

    ``model`` may be wrapped in DistributedDataParallel: the features of every rank are gathered (with
    their gradients) so that the contrastive and KL terms see the global batch.
    """
    reference = batch["reference_image"].to(device, non_blocking=True)
    target = batch["target_image"].to(device, non_blocking=True)
    token_ids = unwrap_model(model).backbone.tokenize(batch["caption"]).to(device)
    optimizer.zero_grad(set_to_none=True)
    with autocast(precision, device):
        features = model(reference, target, token_ids)  # (q⁺, q⁻, t), each [b, D]
    # The loss in fp32 (scale-100 logits and their softmax are where fp16 loses precision), on the global
    # batch: [world·b, D] each.
    q_pos, q_neg, target_features = (all_gather_with_grad(f.float()) for f in features)
    terms = ssn_loss_terms(q_pos, q_neg, target_features, kl_weight=kl_weight)
    loss = terms["loss"]
    scaler.scale(loss).backward()
    grad_norm = None
    if grad_clip:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    elif not scaler.is_enabled():
        grad_norm = _gradient_norm(model)  # with AMP the scaler checks the gradients itself
    loss_finite = bool(torch.isfinite(loss))
    overflow = False
    if scaler.is_enabled():
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skipped by the scaler when the unscaled gradients hold inf / NaN
        scaler.update()
        overflow = scaler.get_scale() < scale  # the scale only drops after an overflow
        finite = loss_finite and not (overflow and scale <= 1.0)
    else:
        finite = loss_finite and bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
    if not finite:
        state.nonfinite_steps += 1
        _logger.warning("non-finite loss or gradient at step %d (loss %s): step skipped (%d in a row)",
                        state.global_step + 1, loss.item(), state.nonfinite_steps)
        if state.nonfinite_steps >= max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{state.nonfinite_steps} consecutive non-finite steps (last loss {loss.item()}) at step "
                f"{state.global_step + 1}; training stopped, the last checkpoint holds the last good state"
            )
        return None
    if overflow:  # neither a failure nor an update: the non-finite streak is left as it is
        state.amp_overflow_steps += 1
        _logger.info("fp16 gradient overflow at step %d: skipped by the GradScaler, scale lowered to %g",
                     state.global_step + 1, scaler.get_scale())
    else:
        state.nonfinite_steps = 0
    state.epoch_loss_sum += loss.item() * reference.shape[0]
    state.epoch_samples += reference.shape[0]
    return terms


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    device: torch.device,
    precision: str,
    kl_weight: float,
    grad_clip: float | None,
    max_nonfinite_steps: int,
    metrics_logger: utils.MetricsLogger | None = None,
    log_every: int = 10,
    num_epochs: int | None = None,
    bad_samples: BadSampleLog | None = None,
    on_step_end: Callable[[], bool] | None = None,
) -> float:
    """Train on the loader's batches (the rest of the epoch when resumed mid-epoch).

    ``state`` is advanced batch by batch (steps, epoch loss sums), so a checkpoint taken at any step
    boundary resumes exactly.  Batches holding :class:`SkippedSample` markers (``--skip_bad_samples``)
    record them in ``bad_samples``.  ``on_step_end`` runs after every batch; returning True stops the
    epoch early (pre-emption).  Returns the epoch's mean loss per trained triplet so far.
    """
    model.train()
    progress = tqdm(loader, desc=f"epoch {state.epoch + 1}/{num_epochs or '?'}", leave=False,
                    initial=state.step_in_epoch, total=state.step_in_epoch + len(loader))
    for batch in progress:
        skipped = batch.pop("skipped_samples", [])
        if skipped:
            if bad_samples is None:
                raise ValueError("the batch holds skipped samples but no BadSampleLog was given")
            bad_samples.add(skipped, state.epoch, state.global_step + 1)
        terms = None
        if "reference_image" in batch:  # else every sample of the batch was unreadable
            terms = _train_step(model, batch, optimizer, scaler, state, device, precision, kl_weight, grad_clip,
                                max_nonfinite_steps)
        state.step_in_epoch += 1
        state.global_step += 1
        if terms is not None:
            progress.set_postfix(loss=f"{state.epoch_loss_sum / state.epoch_samples:.4f}")
            if metrics_logger is not None and state.global_step % log_every == 0:
                metrics_logger.log(
                    {**{k: v.item() for k, v in terms.items()}, "lr": optimizer.param_groups[0]["lr"]},
                    step=state.global_step, epoch=state.epoch, prefix="train/",
                )
        if on_step_end is not None and on_step_end():
            break
    return state.epoch_loss_sum / max(state.epoch_samples, 1)


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


def _rng_state() -> dict[str, Any]:
    """Every global RNG state, as plain types (``torch.load(weights_only=True)`` can read them)."""
    python_version, python_state, python_gauss = random.getstate()
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": python_version, "state": list(python_state), "gauss_next": python_gauss},
        "numpy": {"keys": numpy_keys.tolist(), "pos": int(numpy_pos), "has_gauss": int(numpy_has_gauss),
                  "cached_gaussian": float(numpy_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(state: dict[str, Any]) -> None:
    python, numpy = state["python"], state["numpy"]
    if isinstance(python, dict):
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
        np.random.set_state(("MT19937", np.array(numpy["keys"], dtype=np.uint32), numpy["pos"],
                             numpy["has_gauss"], numpy["cached_gaussian"]))
    else:  # format 1: the state words only
        random.setstate((3, tuple(python), None))
        np.random.set_state(("MT19937", np.array(numpy, dtype=np.uint32), 624, 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(
    model: SSNModel, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
    state: TrainState, args: argparse.Namespace, dataset: str, sampler: ResumableSampler | None = None,
    metrics_log_lines: int | None = None,
) -> dict[str, Any]:
    """Everything needed to resume exactly: weights, optimiser, scheduler, scaler, RNGs, data position.

    ``best_metric`` / ``best_metrics`` are the best validation by ``--best_metric``; ``best_by`` holds
    the best of every selection criterion.
    """
    best = state.best_by.get(args.best_metric, {})
    return {
        "format_version": utils.CHECKPOINT_FORMAT_VERSION,
        "dataset": dataset,
        "model_config": model.config(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": state.epoch,
        "global_step": state.global_step,
        "step_in_epoch": state.step_in_epoch,
        "epoch_loss_sum": state.epoch_loss_sum,
        "epoch_samples": state.epoch_samples,
        "best_metric": best.get("value", -math.inf),
        "best_metrics": best.get("metrics") or {},
        "best_by": state.best_by,
        "amp_overflow_steps": state.amp_overflow_steps,
        "bad_samples": list(state.bad_samples),
        "args": utils.public_args(vars(args)),
        "rng": _rng_state(),
        "sampler": sampler.state_dict() if sampler is not None else {},
        "metrics_log_lines": metrics_log_lines,
    }


# ---------------------------------------------------------------------------------------------- arguments
def build_train_parser(dataset: str) -> argparse.ArgumentParser:
    """Flags of train_cirr.py / train_fiq.py; defaults are the official recipe of each dataset."""
    cirr = dataset == "cirr"
    parser = argparse.ArgumentParser(description=f"Train SSN on {'CIRR' if cirr else 'FashionIQ'}")
    data = parser.add_argument_group("data")
    data.add_argument("--data_root", required=True, help="dataset folder (cirr_dataset / fashion-iq) or its parent")
    data.add_argument("--dataset", default="CIRR" if cirr else "FashionIQ", help="kept for the official command line")
    data.add_argument("--transform", choices=("clip", "targetpad"), default="clip",
                      help="clip: CLIP's resize + centre crop (official SSN); targetpad: CLIP4Cir's pad to --target_ratio first")
    data.add_argument("--target_ratio", type=float, default=1.25)
    data.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
    data.add_argument("--skip_bad_samples", action="store_true",
                      help="skip training samples whose image cannot be read (each is logged and listed in "
                           "<output_dir>/bad_samples.json) instead of stopping with an error naming the file")
    if not cirr:
        data.add_argument("--dress_types", nargs="+", default=list(FIQ_CATEGORIES), choices=FIQ_CATEGORIES)
    mdl = parser.add_argument_group("model")
    mdl.add_argument("--model", default="ssn", choices=("ssn",))
    mdl.add_argument("--clip_model_name", default="ViT-B-32", help="open_clip model name (e.g. ViT-B-32, ViT-L-14, ViT-Tiny-P8-32)")
    mdl.add_argument("--pretrained", default="openai", help="open_clip pretrained tag or a local checkpoint file; 'none' for random weights. The activation follows the tag "
                     "(QuickGELU for openai); for a local file of OpenAI-style weights use a -quickgelu --clip_model_name. "
                     "Also a Hugging Face CLIP directory (config.json + weights; its config gives the architecture), or a "
                     "checkpoint of this project (e.g. from convert_official_checkpoint.py) to fine-tune its backbone and head")
    mdl.add_argument("--nhead", type=int, default=8, help="attention heads of the fusion layer")
    mdl.add_argument("--projection_dim", type=int, default=None, help="official flag; must equal the backbone's text width if given")
    mdl.add_argument("--hidden_dim", type=int, default=None, help="official flag; must equal the backbone's text width if given")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--num_epochs", type=int, default=50 if cirr else 100)
    opt.add_argument("--batch_size", type=int, default=128 if cirr else 384)
    opt.add_argument("--lr", type=float, default=5e-5 if cirr else 4e-5)
    opt.add_argument("--lr_ratio", type=float, default=0.2, help="backbone lr = lr·ratio (head groups scale from it)")
    opt.add_argument("--lr_step_size", type=int, default=10 if cirr else 5)
    opt.add_argument("--lr_gamma", type=float, default=0.1)
    opt.add_argument("--optimizer", choices=("adam", "adamw"), default="adam" if cirr else "adamw")
    opt.add_argument("--weight_decay", type=float, default=None, help="default: the optimiser's own")
    opt.add_argument("--kl_weight", type=float, default=1.0)
    opt.add_argument("--grad_clip", type=float, default=0.0, help="max gradient norm; 0 = off (official)")
    opt.add_argument("--freeze_vision_epoch", type=int, default=-1 if cirr else 1,
                     help="freeze the vision tower from this epoch on (0-based); -1 = never (FashionIQ recipe: 1)")
    opt.add_argument("--max_nonfinite_steps", type=int, default=10, help="stop after this many consecutive non-finite steps")
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default=None, help="default: runs/<dataset>_<timestamp>")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    run.add_argument("--precision", choices=PRECISIONS, default="amp",
                     help="training precision: amp (fp16 + GradScaler) on CUDA, amp_bf16 on CUDA and CPU; "
                          "what does not apply to the device runs fp32 (precision.py)")
    run.add_argument("--eval_precision", choices=PRECISIONS, default="fp32", help=EVAL_PRECISION_HELP)
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh in an --output_dir that holds a previous run (its checkpoints and logs are deleted)")
    run.add_argument("--resume", default=None,
                     help="checkpoint to resume from (e.g. <output_dir>/checkpoints/last.pt), also mid-epoch; "
                          "the output directory defaults to the checkpoint's run")
    run.add_argument("--checkpoint_every", type=int, default=0, metavar="N",
                     help="also write checkpoints/last.pt every N optimisation steps (0 = at epoch ends only)")
    run.add_argument("--deterministic", action="store_true",
                     help="torch.use_deterministic_algorithms(True) (and deterministic cuDNN / cuBLAS on CUDA): "
                          "a resumed run then matches an uninterrupted one bit for bit on CPU")
    run.add_argument("--validation_frequency", type=int, default=1,
                     help="validate after 0-based epochs 0, N, 2N, ... (official) and after the last epoch")
    run.add_argument("--eval_batch_size", type=int, default=64)
    run.add_argument("--save_training", action="store_true", help="official flag: keep a checkpoint per validation (with --save_best: only the best)")
    run.add_argument("--save_best", action="store_true",
                     help="keep checkpoints/best.pt by --best_metric" + (
                         "; CIRR also keeps the official best_mean.pt, best_harmonic.pt, best_geometric.pt" if cirr else ""))
    run.add_argument("--best_metric", choices=utils.SELECTION_CRITERIA[dataset], default=utils.SELECTION_CRITERIA[dataset][0],
                     help="the validation metric best.pt and summary.json follow" + (
                         " (mean, harmonic or geometric mean of the 7 recalls)" if cirr else " (mean of avg R@10 and R@50)"))
    run.add_argument("--log_every", type=int, default=10, help="log training loss every N steps")
    speed = parser.add_argument_group("speed and memory (docs/benchmark.md)")
    speed.add_argument("--torch_compile", action="store_true",
                       help="torch.compile the model's training forward; where compilation is unavailable, "
                            "training runs eagerly after a warning")
    speed.add_argument("--grad_checkpointing", action="store_true",
                       help="recompute the backbone's transformer blocks in the backward pass (same gradients, "
                            "about one more forward pass of compute, a fraction of the activation memory): "
                            "what lets ViT-L/14 train at batch 128 on a 24 GB GPU")
    comet = parser.add_argument_group("comet_ml (optional)")
    comet.add_argument("--api_key", default=None)
    comet.add_argument("--workspace", default=None)
    comet.add_argument("--project_name", default="ssn")
    return parser


def _project_checkpoint(pretrained: str | None) -> dict[str, Any] | None:
    """The checkpoint a ``--pretrained`` file holds when this project wrote it; None for anything else (an
    open_clip weights file, whose errors open_clip reports)."""
    if not pretrained or not Path(pretrained).is_file():
        return None
    try:
        checkpoint = utils.load_checkpoint(pretrained)
    except utils.CheckpointError:
        return None
    return checkpoint if "model_config" in checkpoint and "model" in checkpoint else None


def initial_model(args: argparse.Namespace, pretrained: str | None, device: torch.device) -> SSNModel:
    """The model a run starts from: ``--clip_model_name`` with ``--pretrained`` weights (tag, file or Hugging
    Face directory) and a fresh head; or, when ``--pretrained`` is a checkpoint of this project (a run's
    ``best.pt``, a ``convert_official_checkpoint.py`` output), its backbone and head, fine-tuned with a fresh
    optimiser, schedule and epoch count (``--resume`` continues a run instead)."""
    checkpoint = _project_checkpoint(pretrained)
    if checkpoint is None:
        return build_ssn_model(args.clip_model_name, pretrained=pretrained, nhead=args.nhead, device=device)
    if checkpoint["model_config"].get("nhead") != args.nhead:
        raise ValueError(f"--nhead {args.nhead} differs from the {checkpoint['model_config'].get('nhead')} heads of "
                         f"--pretrained {pretrained}")
    model = ssn_model_from_checkpoint(checkpoint, device=device, source=str(pretrained))
    _logger.info("starting from %s: backbone %s and head from the checkpoint (--clip_model_name not used)",
                 pretrained, model.backbone.model_name)
    return model


def check_official_dims(args: argparse.Namespace, model: SSNModel) -> None:
    """The official ``--projection_dim`` / ``--hidden_dim`` flags must agree with the backbone's text width."""
    for flag in ("projection_dim", "hidden_dim"):
        value = getattr(args, flag)
        if value is not None and value != model.head.width:
            raise ValueError(
                f"--{flag} {value} does not match {args.clip_model_name}'s text width {model.head.width}; "
                "the head width follows the backbone (omit the flag)"
            )


# ---------------------------------------------------------------------------------------------- main loop
# Flags that may change between a run and its resume without changing what is computed.
_RESUME_FREE_ARGS = frozenset({
    "resume", "output_dir", "num_epochs", "num_workers", "device", "eval_batch_size", "checkpoint_every",
    "log_every", "api_key", "workspace", "project_name", "torch_compile", "grad_checkpointing",
})


def compile_for_training(model: nn.Module, device: torch.device) -> bool:
    """``torch.compile`` the model's forward (the training step's) in place; returns whether it did.

    ``nn.Module.compile`` keeps the parameter names, so checkpoints and DDP wrapping are unchanged;
    evaluation calls other methods and stays eager.  Compilation is tried on a one-line function
    first: where it is unavailable (unsupported Python or platform, no C++ compiler for the CPU
    backend) a warning is logged and the model is left eager.
    """
    try:
        if not importlib.import_module("torch._dynamo").is_dynamo_supported():
            raise RuntimeError(f"torch.compile does not support Python {platform.python_version()} on this platform")
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2, device=device))
    except (RuntimeError, OSError, ImportError) as error:
        reason = next(iter(str(error).strip().splitlines()), type(error).__name__)
        _logger.warning("--torch_compile: compilation is unavailable here (%s); training runs eagerly", reason)
        return False
    model.compile()
    return True


def _enable_determinism(device: torch.device) -> None:
    """Deterministic kernels (errors for ops that have none); on CUDA also cuDNN and cuBLAS settings."""
    if device.type == "cuda":
        # cuBLAS needs a fixed workspace for deterministic results; it is read when cuBLAS initialises.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def _count_lines(path: Path) -> int:
    """Complete lines of a text file (0 if it does not exist)."""
    if not path.is_file():
        return 0
    with path.open("rb") as f:
        return sum(1 for line in f if line.endswith(b"\n"))


def _truncate_metrics_log(path: Path, lines: int) -> int:
    """Keep the first ``lines`` lines of ``metrics.jsonl`` (records logged after a checkpoint); returns how many went."""
    if not path.is_file():
        return 0
    content = path.read_bytes().splitlines(keepends=True)
    dropped = len(content) - lines
    if dropped > 0:
        utils.atomic_write_bytes(path, b"".join(content[:lines]))
    return max(dropped, 0)


def _warn_changed_args(saved: dict[str, Any], args: argparse.Namespace, source: str) -> None:
    """Warn about flags that differ from the checkpoint's run: the resumed run then differs from an uninterrupted one."""
    changed = [
        f"--{key} {value!r} (checkpoint: {saved[key]!r})"
        for key, value in vars(args).items()
        if key not in _RESUME_FREE_ARGS and key in saved and saved[key] != value
    ]
    if changed:
        _logger.warning("resuming from %s with changed flags; the run will not match an uninterrupted one: %s",
                        source, ", ".join(changed))


RESUME_KEYS = ("model_config", "model", "optimizer", "scheduler", "scaler", "rng", "epoch", "global_step")


def _resume(
    path: str, model: SSNModel, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
    sampler: ResumableSampler, args: argparse.Namespace,
) -> tuple[TrainState, int | None]:
    """Load a training checkpoint into the run; returns its state and the metrics log length it saw.

    Raises:
        utils.CheckpointError: unreadable or foreign file.
        CheckpointMismatchError: the checkpoint is for another backbone or head size (names the difference).
    """
    checkpoint = utils.load_checkpoint(path, map_location="cpu")
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointMismatchError(f"{path}: not a resumable training checkpoint (missing {', '.join(missing)})")
    check_model_config(checkpoint["model_config"], model.config(), path)
    check_state_dict(model, checkpoint["model"], path)
    model.load_state_dict(checkpoint["model"])
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointMismatchError(f"{path}: optimizer / scheduler state does not fit this run ({error})") from error
    if checkpoint["scaler"] or not scaler.is_enabled():
        scaler.load_state_dict(checkpoint["scaler"])
    else:  # an fp32 (e.g. CPU) checkpoint resumed with fp16 AMP: there is no scale to carry over
        _logger.warning("resuming %s with fp16 AMP from a checkpoint without GradScaler state: fresh scale", path)
    _warn_changed_args(checkpoint.get("args", {}), args, path)
    saved_sampler = checkpoint.get("sampler") or {}
    for key in ("num_samples", "batch_size", "num_replicas"):
        if key in saved_sampler and saved_sampler[key] != getattr(sampler, key):
            _logger.warning("resuming from %s: the sampler's %s was %s, now %s; the epoch order differs",
                            path, key, saved_sampler[key], getattr(sampler, key))
    state = TrainState.from_checkpoint(checkpoint)
    if state.step_in_epoch > sampler.steps_per_epoch:
        raise ValueError(f"{path} stopped at step {state.step_in_epoch} of an epoch, but an epoch now has "
                         f"{sampler.steps_per_epoch} steps (dataset or batch size changed)")
    _restore_rng_state(checkpoint["rng"])
    return state, checkpoint.get("metrics_log_lines")


RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "bad_samples.json")


def _claim_output_dir(output_dir: Path, args: argparse.Namespace) -> None:
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


def run_training(args: argparse.Namespace, dataset: str) -> Path:
    """Train SSN with periodic validation and checkpointing; returns the output directory.

    Fault tolerance (docs/fault_tolerance.md): ``checkpoints/last.pt`` is written atomically at every
    epoch end and every ``--checkpoint_every`` steps; ``--resume`` continues from any of them exactly.
    SIGTERM / SIGINT write ``last.pt`` at the next step boundary and return early (no summary.json).
    Checkpoints are never written during a streak of non-finite steps, so after a
    :class:`NonFiniteLossError` ``last.pt`` holds the last good state.
    """
    env: DistributedEnv = init_distributed(args.device)
    device = env.device
    precision = effective_precision(args.precision, device)
    eval_precision = effective_precision(args.eval_precision, device)
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint_every must be >= 0, got {args.checkpoint_every}")
    if args.validation_frequency < 1:
        raise ValueError(f"--validation_frequency must be >= 1, got {args.validation_frequency}")
    if args.skip_bad_samples and env.is_distributed:
        # A skipped sample shrinks one rank's batch, and the gathered loss needs equal batches on every rank.
        raise ValueError("--skip_bad_samples is single-process only; fix or remove the bad files for torchrun")
    if args.output_dir:
        output_dir = Path(args.output_dir)
    elif args.resume:
        output_dir = run_directory(args.resume)
    else:
        output_dir = Path(f"runs/{dataset}_{datetime.now():%Y%m%d_%H%M%S}")
    checkpoint_dir = output_dir / "checkpoints"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    # Rank 0 owns every output (log file, metrics, checkpoints, validation); other ranks only train.
    logger = utils.setup_logging(output_dir if env.is_master else None)
    if env.is_master:
        _claim_output_dir(output_dir, args)
    if device.type == "cpu" and utils.tune_cpu_allocator():
        logger.info("glibc allocator tuned for CPU training (utils.tune_cpu_allocator)")
    if args.deterministic:
        _enable_determinism(device)
    utils.set_seed(args.seed)

    root = resolve_dataset_root(args.data_root, dataset)
    pretrained = parse_pretrained(args.pretrained)
    model = initial_model(args, pretrained, device)
    check_official_dims(args, model)
    if args.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    if args.torch_compile:
        compile_for_training(model, device)
    if pretrained is None:
        logger.info("backbone %s starts from random weights (--pretrained none)", args.clip_model_name)
    transform = build_transform(args.transform, model.backbone.image_size, args.target_ratio)
    # Datasets check every file they reference up front: a broken dataset fails here, not in epoch 37.
    if dataset == "cirr":
        train_set: Dataset = CIRRDataset(root, "train", "relative", transform)
    else:
        train_set = FashionIQDataset(root, "train", args.dress_types, "relative", transform)
    val_sets = retrieval_sets(dataset, root, "val", transform, getattr(args, "dress_types", FIQ_CATEGORIES))
    sampler = ResumableSampler(len(train_set), args.batch_size, args.seed, num_replicas=env.world_size, rank=env.rank)
    if sampler.steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training triplets is less than one batch of {args.batch_size}")
    # Seeds the DataLoader workers only (the order comes from the sampler); reseeded per epoch below.
    loader_generator = torch.Generator()
    train_data = SkipBadSamples(train_set) if args.skip_bad_samples else train_set
    train_loader = make_loader(train_data, args.batch_size, args.num_workers, device, drop_last=True,
                               generator=loader_generator, sampler=sampler, worker_init_fn=train_worker_init)

    optimizer = model.configure_optimizers(args.lr, args.lr_ratio, args.optimizer, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
    scaler = grad_scaler(precision, device)
    state = TrainState()
    metrics_path = output_dir / "metrics.jsonl"
    if args.resume:
        state, metrics_log_lines = _resume(args.resume, model, optimizer, scheduler, scaler, sampler, args)
        if metrics_log_lines is not None and run_directory(args.resume).resolve() == output_dir.resolve():
            dropped = _truncate_metrics_log(metrics_path, metrics_log_lines)
            if dropped:
                logger.info("dropped %d metrics records logged after the checkpoint was written", dropped)
        logger.info("resumed from %s at epoch %d, step %d of %d (global step %d)", args.resume, state.epoch + 1,
                    state.step_in_epoch, sampler.steps_per_epoch, state.global_step)
    bad_samples_file = "bad_samples.json" if env.is_master else f"bad_samples_rank{env.rank}.json"
    bad_samples = BadSampleLog(output_dir / bad_samples_file, state.bad_samples) if args.skip_bad_samples else None
    train_model = wrap_model(model, env)  # DDP broadcasts rank 0's weights to every rank here

    metrics_logger = None
    if env.is_master:
        # A resumed run keeps the original args.json and records its own command line beside it.
        args_file = f"args_resume_step{state.global_step}.json" if args.resume else "args.json"
        utils.atomic_write_json(output_dir / args_file, utils.public_args(vars(args)))
        metrics_logger = utils.MetricsLogger(
            output_dir, comet_api_key=args.api_key, comet_workspace=args.workspace,
            comet_project=args.project_name, run_args=utils.public_args(vars(args)),
        )
    logger.info("training %s on %s (%d triplets, %d steps/epoch of %d x %d triplets) on %s, precision %s "
                "(validation %s); outputs in %s", args.clip_model_name, dataset, len(train_set), sampler.steps_per_epoch,
                env.world_size, args.batch_size, device, precision, eval_precision, output_dir)

    def save(path: Path, *same_as_path: Path) -> None:
        """Write the checkpoint to ``path``; ``same_as_path`` become links to (or copies of) it."""
        if not env.is_master:
            return
        if state.nonfinite_steps:  # never replace a good checkpoint by a state inside a non-finite streak
            logger.warning("not writing %s during %d non-finite steps in a row", path, state.nonfinite_steps)
            return
        utils.save_checkpoint(path, checkpoint_state(model, optimizer, scheduler, scaler, state, args, dataset,
                                                     sampler, _count_lines(metrics_path)))
        for other in same_as_path:
            utils.atomic_link_or_copy(path, other)

    with PreemptionHandler() as preemption:

        def on_step_end() -> bool:
            if any_rank(preemption.requested, env):  # every rank stops at the same step
                save(checkpoint_dir / "last.pt")
                return True
            if args.checkpoint_every and state.global_step % args.checkpoint_every == 0:
                save(checkpoint_dir / "last.pt")
            return False

        try:
            while state.epoch < args.num_epochs and not preemption.requested:
                epoch = state.epoch
                if 0 <= args.freeze_vision_epoch <= epoch and model.vision_tower_trainable:
                    model.freeze_vision_tower()
                    train_model = wrap_model(model, env)  # DDP must see which parameters still train
                sampler.set_epoch(epoch, start_step=state.step_in_epoch)
                loader_generator.manual_seed(loader_seed(args.seed, epoch, state.step_in_epoch))
                start = time.time()
                train_one_epoch(
                    train_model, train_loader, optimizer, scaler, state, device, precision, args.kl_weight,
                    args.grad_clip or None, args.max_nonfinite_steps, metrics_logger, args.log_every, args.num_epochs,
                    bad_samples, on_step_end,
                )
                if state.step_in_epoch < sampler.steps_per_epoch:  # stopped by a signal; last.pt is written
                    break
                scheduler.step()
                epoch_loss = state.end_epoch()
                if metrics_logger is not None:
                    metrics_logger.log({"epoch_loss": epoch_loss, "epoch_time_s": time.time() - start,
                                        "lr": scheduler.get_last_lr()[0]}, step=state.global_step, epoch=state.epoch,
                                       prefix="train/")
                logger.info("epoch %d/%d: loss %.4f (%.1f s)", state.epoch, args.num_epochs, epoch_loss, time.time() - start)

                if validation_due(state.epoch - 1, args.validation_frequency, args.num_epochs) and env.is_master:
                    metrics = evaluate(model, val_sets, dataset, device, eval_precision, "ssn", args.eval_batch_size,
                                       args.num_workers)
                    metrics_logger.log(metrics, step=state.global_step, epoch=state.epoch, prefix="val/")
                    logger.info("validation after epoch %d:\n%s", state.epoch, utils.metrics_table(metrics))
                    improved = state.record_validation(metrics, dataset)
                    if args.save_best and improved:
                        save(*(checkpoint_dir / name for name in best_checkpoint_files(dataset, improved, args.best_metric)))
                    elif args.save_training and not args.save_best:
                        save(checkpoint_dir / f"epoch_{state.epoch}.pt")
                save(checkpoint_dir / "last.pt")
                barrier(env)  # the other ranks wait for rank 0's validation and checkpoints
        except DataError as error:
            logger.error("%s\n(--skip_bad_samples skips unreadable training samples, listing them in bad_samples.json)", error)
            raise
        finally:
            if metrics_logger is not None:
                metrics_logger.close()
            if bad_samples is not None:
                bad_samples.write()
                logger.info("%d training sample(s) skipped as unreadable; listed in %s", len(bad_samples.records),
                            bad_samples.path)

    stopped_early = state.epoch < args.num_epochs
    cleanup_distributed()
    if stopped_early:
        logger.warning("stopped by %s at epoch %d, step %d of %d; continue with --resume %s",
                       preemption.received.name if preemption.received else "a signal to another rank", state.epoch + 1, state.step_in_epoch, sampler.steps_per_epoch,
                       checkpoint_dir / "last.pt")
        return output_dir

    if not env.is_master:
        return output_dir
    # Every validation records every criterion; only a legacy checkpoint resumed after its last epoch lacks one.
    best = state.best_by.get(args.best_metric, {"value": None, "epoch": None, "metrics": None})
    summary = {
        "best_metric_name": args.best_metric, "best_metric": best["value"], "best_epoch": best["epoch"],
        "best_metrics": best["metrics"],
        "best_by": {criterion: {"value": b["value"], "epoch": b["epoch"]} for criterion, b in state.best_by.items()},
        "epochs": state.epoch, "steps": state.global_step,
        "precision": precision, "eval_precision": eval_precision,  # what ran, after effective_precision
        "amp_overflow_steps": state.amp_overflow_steps,
    }
    utils.atomic_write_json(output_dir / "summary.json", summary)
    # Curves + report.md; a plotting failure is logged as a warning, the checkpoints are already saved.
    write_run_report_safely(output_dir, device=str(device))
    logger.info("done: best %s %s (epoch %s); checkpoints in %s", args.best_metric, best["value"], best["epoch"],
                checkpoint_dir)
    return output_dir


DATASET_NAMES = {"cirr": ("cirr",), "fashioniq": ("fashioniq", "fiq")}


def main_for(dataset: str, argv: Sequence[str] | None) -> Path:
    """Parse a training script's command line and train; ``dataset`` is 'cirr' or 'fashioniq'."""
    args = build_train_parser(dataset).parse_args(argv)
    if args.dataset.lower().replace("-", "").replace("_", "") not in DATASET_NAMES[dataset]:
        raise ValueError(f"--dataset {args.dataset} does not match this script, which trains on {dataset}")
    return run_training(args, dataset)



# ---------------------------------------------------------------------------------------------- inference
@dataclass
class TrainedModel:
    model: SSNModel
    dataset: str  # 'cirr' or 'fashioniq'
    train_args: dict[str, Any]
    transform: Any


def run_directory(checkpoint_path: str | os.PathLike) -> Path:
    """The run folder of a checkpoint (``<run>/checkpoints/x.pt`` -> ``<run>``)."""
    checkpoint = Path(checkpoint_path)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def preprocessing_settings(trained: TrainedModel, precision: str) -> dict[str, str]:
    """What, besides the weights, changes a trained model's gallery features (feature cache keys)."""
    args = trained.train_args
    return {"precision": precision, "transform": str(args.get("transform", "clip")),
            "transform_revision": str(TRANSFORM_REVISION),
            "target_ratio": str(args.get("target_ratio", 1.25)), "image_size": str(trained.model.backbone.image_size)}


def load_trained_model(checkpoint_path: str | os.PathLike, device: torch.device) -> TrainedModel:
    """Rebuild the model, its preprocessing and dataset from a training checkpoint alone."""
    checkpoint = utils.load_checkpoint(checkpoint_path, map_location="cpu")
    if checkpoint.get("dataset") not in DATASET_NAMES:
        raise utils.CheckpointError(f"checkpoint {checkpoint_path}: no training dataset recorded (not written by training.py)")
    model = ssn_model_from_checkpoint(checkpoint, device=device, source=str(checkpoint_path)).eval()
    train_args = checkpoint.get("args", {})
    transform = build_transform(train_args.get("transform", "clip"), model.backbone.image_size, train_args.get("target_ratio", 1.25))
    return TrainedModel(model, checkpoint["dataset"], train_args, transform)
