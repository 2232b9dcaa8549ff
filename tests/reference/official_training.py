"""The official SSN training loop's validation schedule and best-checkpoint rule, re-stated for tests.

Our own re-statement of what starxing-yuu/SSN ``src/train_cirr.py`` does (not its code):

* the loop runs 0-based epochs ``0 .. num_epochs-1`` and validates after epoch ``e`` when
  ``e % validation_frequency == 0``;
* each validation computes the 7 CIRR recalls (R@1, R@5, R@10, R@50, Rs@1, Rs@2, Rs@3) and their
  arithmetic, harmonic and geometric means with Python's ``statistics`` module;
* with ``--save_training --save_best`` it keeps three files, ``combiner_arithmetic.pt``,
  ``combiner_harmonic.pt`` and ``combiner_geometric.pt``, each replaced when its mean is strictly
  greater than the best so far (the bests start at 0).
"""
from __future__ import annotations

import statistics
from typing import Sequence

OFFICIAL_FILES = {"arithmetic": statistics.mean, "harmonic": statistics.harmonic_mean, "geometric": statistics.geometric_mean}


def official_validated_epochs(num_epochs: int, frequency: int) -> list[int]:
    """The 0-based epochs after which the official loop validates."""
    return [epoch for epoch in range(num_epochs) if epoch % frequency == 0]


def official_best_epochs(recalls_by_epoch: Sequence[tuple[int, Sequence[float]]]) -> dict[str, int]:
    """For each official best file, the 0-based epoch whose model it holds at the end.

    ``recalls_by_epoch``: (epoch, the 7 recalls) of each validation, in order.
    """
    best = {name: 0.0 for name in OFFICIAL_FILES}
    saved_at: dict[str, int] = {}
    for epoch, recalls in recalls_by_epoch:
        for name, average in OFFICIAL_FILES.items():
            value = average(recalls)
            if value > best[name]:
                best[name] = value
                saved_at[name] = epoch
    return saved_at
