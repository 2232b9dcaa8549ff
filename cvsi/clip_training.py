"""A brief contrastive training of an open_clip model on image-caption pairs, for demos and tests that need a
CLIP whose features carry some signal where no pretrained weights fit (e.g. the synthetic CVSI demo).

For a batch of B pairs with images ``x_i`` and captions ``c_i``, the unit embeddings ``u_i = f_v(x_i) /
‖f_v(x_i)‖`` and ``v_i = f_t(c_i) / ‖f_t(c_i)‖`` [B, D] and the learnt temperature ``τ = exp(logit_scale)``,
the loss is CLIP's symmetric cross-entropy (open_clip's ``ClipLoss``)::

    L = ½ · [ CE(τ · U Vᵀ, I) + CE(τ · V Uᵀ, I) ]        (row i's class is its own pair i)

Both towers, the token embeddings and ``logit_scale`` are trained, with AdamW, a linear warm-up and a cosine
decay (open_clip's schedule). Groups of consecutive pairs can be kept in one batch (``group_size``), so
that near-duplicates in the data act as hard negatives of each other. The initial weights and every
epoch's order come from ``seed``. The result is
saved as the open_clip model's state dict (:func:`save_clip`), which :func:`model.create_backbone` (and
``--pretrained PATH`` of ``zero_shot_cvsi.py`` and ``train_phi.py``) loads as it is.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from model import CLIPBackbone, create_backbone
from utils import atomic_torch_save

__all__ = ["ContrastiveConfig", "train_contrastive", "save_clip", "in_batch_accuracy"]

_logger = logging.getLogger("cir.cvsi.clip_training")


@dataclass(frozen=True)
class ContrastiveConfig:
    """What a brief contrastive run depends on (with the pairs it is given)."""

    clip_model_name: str = "ViT-Tiny-P16-64"
    steps: int = 300
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    group_size: int = 1  # consecutive pairs that share a batch (hard negatives of each other)
    seed: int = 0
    log_every: int = 50

    def check(self) -> None:
        """Raise a one-line ValueError for an unusable setting."""
        for name in ("steps", "batch_size", "group_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.group_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of group_size {self.group_size}")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("learning_rate must be > 0, weight_decay and warmup_steps >= 0")


def _schedule(config: ContrastiveConfig, step: int) -> float:
    """The learning-rate factor at ``step``: linear warm-up to 1, then a cosine decay to 0."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _batches(size: int, config: ContrastiveConfig, epoch: int) -> list[list[int]]:
    """One epoch's batches of item indices: the groups of ``group_size`` consecutive items in a seeded
    order, kept together; the last incomplete batch dropped."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    order = torch.randperm(size // config.group_size, generator=generator).tolist()
    items = [group * config.group_size + member for group in order for member in range(config.group_size)]
    return [items[i:i + config.batch_size] for i in range(0, len(items) - config.batch_size + 1, config.batch_size)]


def _collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([image for image, _ in items]), [caption for _, caption in items]


def train_contrastive(config: ContrastiveConfig, pairs: Dataset, device: torch.device | str = "cpu",
                      num_workers: int = 0) -> tuple[CLIPBackbone, list[dict[str, Any]]]:
    """Train ``config.clip_model_name`` from random weights on ``pairs`` (module docstring for the loss).

    Args:
        pairs: items ``(image [3, H, W] preprocessed for the model, caption)``; at least one batch of them;
            with ``config.group_size`` g, items ``g·k … g·k + g − 1`` always share a batch.

    Returns:
        The trained backbone (eval mode, frozen) and the log: per ``log_every`` steps the mean loss and the
        in-batch image-to-text accuracy (the fraction of images whose own caption scores highest).
    """
    config.check()
    if len(pairs) < config.batch_size:
        raise ValueError(f"{len(pairs)} image-caption pairs, fewer than one batch ({config.batch_size})")
    torch.manual_seed(config.seed)
    backbone = create_backbone(config.clip_model_name, device=device)
    clip = backbone.clip
    clip.logit_scale.requires_grad_(True)  # CLIPBackbone freezes it for retrieval; CLIP training learns it
    parameters = [p for p in clip.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _schedule(config, step))
    loss_fn = open_clip.loss.ClipLoss()
    backbone.train()
    log: list[dict[str, Any]] = []
    losses: list[float] = []
    hits: list[float] = []
    step = epoch = 0
    while step < config.steps:
        loader = DataLoader(pairs, batch_sampler=_batches(len(pairs), config, epoch), collate_fn=_collate,
                            num_workers=num_workers)
        epoch += 1
        for images, captions in loader:
            image = F.normalize(backbone.encode_image(images.to(device)).embeds, dim=-1)  # U [B, D]
            text = F.normalize(backbone.encode_text(backbone.tokenize(captions).to(device)).embeds, dim=-1)  # V
            loss = loss_fn(image, text, clip.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, math.log(100))  # as open_clip's training loop
            step += 1
            losses.append(loss.item())
            hits.append(in_batch_accuracy(image.detach(), text.detach()))
            if step % config.log_every == 0 or step == config.steps:
                log.append({"step": step, "loss": sum(losses) / len(losses), "accuracy": sum(hits) / len(hits),
                            "temperature": clip.logit_scale.exp().item()})
                _logger.info("CLIP step %d: loss %.3f, in-batch image->text accuracy %.2f", step, log[-1]["loss"],
                             log[-1]["accuracy"])
                losses, hits = [], []
            if step == config.steps:
                break
    backbone.eval().requires_grad_(False)
    return backbone, log


def in_batch_accuracy(image: torch.Tensor, text: torch.Tensor) -> float:
    """The fraction of rows ``i`` of ``image`` [B, D] whose most similar row of ``text`` [B, D] is ``i``."""
    return (image @ text.T).argmax(dim=1).eq(torch.arange(len(image), device=image.device)).float().mean().item()


def save_clip(backbone: CLIPBackbone, path: str | os.PathLike) -> None:
    """Atomically write the open_clip model's state dict; ``create_backbone(name, pretrained=path)`` loads it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path, backbone.clip.state_dict())
