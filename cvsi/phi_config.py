"""The settings of a Φ training run (:mod:`cvsi.phi_training`), apart from the training code: ``train_phi.py``
builds its command line from :class:`PhiTrainingConfig` without importing torch, so ``--help`` answers at once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from precision import PRECISIONS

__all__ = ["PhiTrainingConfig", "MASKS", "TAGGERS"]

MASKS = ("keywords", "template")
TAGGERS = ("heuristic", "spacy")


@dataclass
class PhiTrainingConfig:
    """Everything a Φ training run depends on; defaults are LinCIR's recipe (single-GPU batch 256)."""

    captions: list[str] = field(default_factory=list)  # caption corpus files (.txt / .json)
    output_dir: str = "phi_runs/run"
    clip_model_name: str = "ViT-B-32"
    pretrained: str | None = "openai"
    batch_size: int = 256
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0  # linear warm-up, then constant (LinCIR: constant_with_warmup, 0 warm-up steps)
    max_train_steps: int = 20000
    dropout: float = 0.5
    noise_scale: float = 1.0
    mask: str = "keywords"
    template: str = "a photo of $"
    tagger: str = "heuristic"
    val_fraction: float = 0.0  # held-out captions for phi_best.pt (LinCIR picks it by CIRR val R@1)
    checkpointing_steps: int = 1000
    log_every: int = 50
    precision: str = "fp32"
    num_workers: int = 0
    device: str | None = None
    seed: int = 0
    resume: bool = False

    def check(self) -> None:
        """Raise a one-line ValueError for an unusable setting."""
        if not self.captions:
            raise ValueError("no caption corpus given (--captions FILE ...)")
        for name in ("batch_size", "max_train_steps", "checkpointing_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mask not in MASKS or self.tagger not in TAGGERS or self.precision not in PRECISIONS:
            raise ValueError(f"mask must be one of {MASKS}, tagger one of {TAGGERS}, precision one of {PRECISIONS}")
        if not 0.0 <= self.val_fraction < 1.0 or not 0.0 <= self.dropout < 1.0 or self.noise_scale < 0:
            raise ValueError("val_fraction and dropout must lie in [0, 1), noise_scale must be >= 0")
        from cvsi.pseudo_tokens import PSEUDO_WORD  # torch: imported only when a run is checked

        if self.template.split().count(PSEUDO_WORD) < 1:
            raise ValueError(f"template {self.template!r} has no {PSEUDO_WORD!r} word")

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        keep = ("clip_model_name", "pretrained", "batch_size", "learning_rate", "weight_decay", "warmup_steps",
                "dropout", "noise_scale", "mask", "template", "tagger", "val_fraction", "seed")
        return {key: getattr(self, key) for key in keep}
