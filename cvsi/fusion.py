"""CVSI's complementary information retrieval (Eqs. 8-10).

``q = α q_m + β q_f + (1−α−β) q_v`` and ``t = γ t_c + (1−γ) t_v``, compared by cosine similarity.
Components are the L2-normalised CLIP features (``q_m`` and ``t_c`` are means of normalised caption
features, as in Eqs. 5 and 7, not normalised again). Dropping a component (the paper's ablations) sets
its weight to 0; cosine similarity makes the remaining weights' scale irrelevant.

Two scorings (:data:`SCORINGS`):

* ``paper`` — Eq. 10: ``s(q, t) = q·t / (‖q‖ ‖t‖)``.
* ``release`` — the released code: ``s(q, t) = q·t`` with the fused ``t`` not normalised, and on
  FashionIQ ``t_c`` re-normalised to unit length before Eq. 9. (A query's scale does not change its
  ranking, so normalising ``q`` or not is the same ranking.)

With unit ``t_v`` and a ``t_c`` of norm < 1 (a mean of unit vectors), ``‖t‖`` differs between gallery
images, so the two scorings rank differently. :class:`FusedRetrieval` hands one weighting to the
project's :func:`evaluation.evaluate` and the registry's metrics and submission writers.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from dataset_registry import RetrievalTask

if TYPE_CHECKING:  # torch is imported where used: cvsi/params.py builds the --help of a run from these constants
    from torch import Tensor

__all__ = [
    "FusionWeights", "DatasetPreset", "DATASET_PRESETS", "COMPONENTS", "GROUPS", "ABLATIONS", "SCORINGS", "fuse_query",
    "fuse_target", "scored_t_c", "ranking_target", "Components", "FusedRetrieval",
]

COMPONENTS = ("q_m", "q_f", "q_v", "t_c", "t_v")
SCORINGS = ("paper", "release")
# Decimal places the visual weights 1−α−β and 1−γ are rounded to (see FusionWeights.query).
_DIGITS = 9
# The paper's "visual" / "semantic information extraction" components (Table III rows 1 and 2).
GROUPS = {"visual": ("q_f", "q_v", "t_v"), "semantic": ("q_m", "t_c")}
# Table III of the paper: row name -> components dropped.
ABLATIONS = {
    "w/o visual information extraction": GROUPS["visual"],
    "w/o semantic information extraction": GROUPS["semantic"],
    "w/o reference image features": ("q_v",),
    "w/o fine-grained features": ("q_f",),
    "w/o average modified captions features": ("q_m",),
    "w/o target images features": ("t_v",),
    "w/o target average captions features": ("t_c",),
}


@dataclass(frozen=True)
class FusionWeights:
    """α (q_m), β (q_f), γ (t_c); the visual terms get 1−α−β and 1−γ. ``dropped`` components get 0."""

    alpha: float
    beta: float
    gamma: float
    dropped: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if self.alpha + self.beta > 1.0 + 1e-9:
            raise ValueError(f"alpha + beta must be <= 1, got {self.alpha} + {self.beta}")
        unknown = set(self.dropped) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; expected some of {COMPONENTS}")

    def without(self, components: Iterable[str]) -> "FusionWeights":
        """These weights with more components dropped (group names 'visual' / 'semantic' allowed)."""
        expanded = {c for name in components for c in GROUPS.get(name, (name,))}
        return replace(self, dropped=self.dropped | frozenset(expanded))

    def query(self) -> dict[str, float]:
        """Weights of q_m, q_f, q_v."""
        # Rounded so that 1 − 0.6 − 0.4 is 0, not 5.6e-17 (which would ask for q_v).
        raw = {"q_m": self.alpha, "q_f": self.beta, "q_v": round(1.0 - self.alpha - self.beta, _DIGITS)}
        return {k: 0.0 if k in self.dropped else v for k, v in raw.items()}

    def target(self) -> dict[str, float]:
        """Weights of t_c, t_v."""
        raw = {"t_c": self.gamma, "t_v": round(1.0 - self.gamma, _DIGITS)}
        return {k: 0.0 if k in self.dropped else v for k, v in raw.items()}

    def needed(self) -> set[str]:
        """Components with a non-zero weight: the only ones worth computing."""
        weights = {**self.query(), **self.target()}
        return {k for k, v in weights.items() if v > 0}

    def check_usable(self) -> None:
        """Both sides need at least one component with a non-zero weight."""
        if not any(self.query().values()) or not any(self.target().values()):
            raise ValueError(f"no query or no gallery component left: query {self.query()}, target {self.target()}")


@dataclass(frozen=True)
class DatasetPreset:
    """CVSI's choices for one dataset: the paper's weights (§IV-A2) and whether the released code
    re-normalises ``t_c`` before Eq. 9 under ``--scoring release`` (it does on FashionIQ only)."""

    weights: FusionWeights
    release_unit_t_c: bool = False


# Paper §IV-A2: CIRR and CIRCO rely on semantics, FashionIQ on visual information. A dataset of the
# registry without an entry here runs with --alpha, --beta and --gamma given.
DATASET_PRESETS = {
    "cirr": DatasetPreset(FusionWeights(0.6, 0.4, 0.2)),
    "circo": DatasetPreset(FusionWeights(0.6, 0.4, 0.2)),
    "fashioniq": DatasetPreset(FusionWeights(0.2, 0.6, 0.1), release_unit_t_c=True),
}


def _weighted_sum(weights: dict[str, float], features: dict[str, Tensor | None]) -> Tensor:
    missing = [name for name, w in weights.items() if w > 0 and features[name] is None]
    if missing:
        raise ValueError(f"components {missing} have a non-zero weight but were not computed")
    terms = [w * features[name] for name, w in weights.items() if w > 0]
    if not terms:
        raise ValueError("every component has weight 0")
    return sum(terms[1:], terms[0])


def fuse_query(weights: FusionWeights, q_m: Tensor | None, q_f: Tensor | None, q_v: Tensor | None) -> Tensor:
    """q [Q, D] = α q_m + β q_f + (1−α−β) q_v (Eq. 8); each input [Q, D], None if not computed."""
    return _weighted_sum(weights.query(), {"q_m": q_m, "q_f": q_f, "q_v": q_v})


def fuse_target(weights: FusionWeights, t_c: Tensor | None, t_v: Tensor | None) -> Tensor:
    """t [G, D] = γ t_c + (1−γ) t_v (Eq. 9); each input [G, D], None if not computed."""
    return _weighted_sum(weights.target(), {"t_c": t_c, "t_v": t_v})


def scored_t_c(t_c: Tensor, scoring: str, release_unit_t_c: bool) -> Tensor:
    """``t_c`` [G, D] as it enters Eq. 9: as computed (a mean of unit vectors) under 'paper'; under
    'release', re-normalised to unit length where the released code does (``release_unit_t_c``:
    :attr:`DatasetPreset.release_unit_t_c`)."""
    import torch.nn.functional as F

    _check_scoring(scoring)
    return F.normalize(t_c, dim=-1) if scoring == "release" and release_unit_t_c else t_c


def ranking_target(target: Tensor, scoring: str) -> Tensor:
    """The fused ``t`` [G, D] whose dot product with the normalised ``q`` ranks the gallery.

    'paper': L2-normalised, so ``q·t`` is the cosine similarity of Eq. 10. 'release': as fused (its norm
    varies between gallery images and changes the ranking; normalising ``q`` does not).
    """
    import torch.nn.functional as F

    _check_scoring(scoring)
    return F.normalize(target, dim=-1) if scoring == "paper" else target


def _check_scoring(scoring: str) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {SCORINGS}")


@dataclass
class Components:
    """One task's CVSI components (None where not computed): ``q_m``, ``q_f``, ``q_v`` [Q, D] in query
    order and ``t_c``, ``t_v`` [G, D] in gallery order."""

    q_m: Tensor | None = None
    q_f: Tensor | None = None
    q_v: Tensor | None = None
    t_c: Tensor | None = None
    t_v: Tensor | None = None


class FusedRetrieval:
    """The retrieval method (:class:`evaluation.RetrievalMethod`) of one weighting of CVSI's components.

    ``encode_queries`` gives the normalised fused ``q`` (Eq. 8), ``encode_gallery`` the fused ``t``
    (Eq. 9) as :func:`ranking_target` ranks it (unnormalised under 'release' scoring). The components of
    each task are computed once and shared by every weighting (the paper's ablation rows).

    Args:
        name: the row's name (result tables).
        weights: α, β, γ and the dropped components.
        components: task name -> :class:`Components`.
        scoring: 'paper' or 'release'; ``release_unit_t_c``: see :func:`scored_t_c`.
    """

    def __init__(self, name: str, weights: FusionWeights, components: Mapping[str, Components],
                 scoring: str = "paper", release_unit_t_c: bool = False) -> None:
        _check_scoring(scoring)
        self.name, self.weights, self.components = name, weights, components
        self.scoring, self.release_unit_t_c = scoring, release_unit_t_c

    def encode_queries(self, task: RetrievalTask) -> Tensor:
        import torch.nn.functional as F

        c = self.components[task.name]
        return F.normalize(fuse_query(self.weights, c.q_m, c.q_f, c.q_v), dim=-1)

    def encode_gallery(self, task: RetrievalTask) -> Tensor:
        c = self.components[task.name]
        t_c = None if c.t_c is None else scored_t_c(c.t_c, self.scoring, self.release_unit_t_c)
        return ranking_target(fuse_target(self.weights, t_c, c.t_v), self.scoring)
