"""The order in which a run visits its training triplets, resumable at any step, and worker seeding."""
from __future__ import annotations

import signal
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

import utils


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
    checkpoint at the next step (see :class:`training.resilience.PreemptionHandler`), which needs the
    workers alive until it shuts them down.  Workers still exit when the main process dies (DataLoader's
    watchdog).
    """
    utils.seed_worker(worker_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
