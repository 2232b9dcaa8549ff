"""SSN = open_clip backbone + SSN head.  The model returns features; the loss lives in ``loss.py``."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from utils import UserError

from . import hf_clip
from .backbone import CLIPBackbone, create_backbone, resolve_quick_gelu
from .retrievers import RETRIEVERS, get_retriever
from .ssn_head import SSNHead

# Retrieval methods: SSN itself and the backbone-only baselines it is compared with (the registered ones).
RETRIEVAL_METHODS = tuple(RETRIEVERS)


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint was made for another backbone or head size."""


class SSNModel(nn.Module):
    """Composed image retrieval with the Semantic Shift Network.

    Args:
        backbone: the CLIP backbone (fine-tuned with the head).
        nhead: attention heads of the head's fusion layer.
    """

    def __init__(self, backbone: CLIPBackbone, nhead: int = 8) -> None:
        super().__init__()
        self.backbone = backbone
        self.nhead = nhead
        self.head = SSNHead(backbone.image_token_dim, backbone.text_width, backbone.embed_dim, nhead=nhead)

    # ------------------------------------------------------------------ training forward
    def forward(self, reference_images: Tensor, target_images: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """reference_images, target_images [B, 3, H, W]; token_ids [B, L] -> (q⁺, q⁻, t), each [B, D]."""
        batch = reference_images.shape[0]
        # One vision pass for references and targets together.
        images = self.backbone.encode_image(torch.cat([reference_images, target_images]))
        text = self.backbone.encode_text(token_ids)
        ref_tokens, tgt_tokens = images.tokens[:batch], images.tokens[batch:]
        ref_embeds, tgt_embeds = images.embeds[:batch], images.embeds[batch:]
        q_pos, q_neg = self.head.compose(ref_tokens, ref_embeds, text.tokens, text.embeds, text.mask)
        target = self.head.encode_target(tgt_tokens, tgt_embeds)
        return q_pos, q_neg, target

    # ------------------------------------------------------------------ retrieval
    def encode_query(self, reference_images: Tensor, token_ids: Tensor, method: str = "ssn") -> Tensor:
        """Normalised query features [B, D] of a retrieval ``method`` (:mod:`model.retrievers`)."""
        return get_retriever(method).encode_query(self, reference_images, token_ids)

    def encode_gallery(self, images: Tensor, method: str = "ssn") -> Tensor:
        """Normalised gallery features [B, D] of a retrieval ``method`` (:mod:`model.retrievers`)."""
        return get_retriever(method).encode_gallery(self, images)

    def text_selection(self, reference_images: Tensor, token_ids: Tensor) -> Tensor:
        """The per-word upgradation weight ``s_t`` [B, L] (0 = degradation word)."""
        image = self.backbone.encode_image(reference_images)
        text = self.backbone.encode_text(token_ids)
        s_t, _ = self.head.selection_weights(image.tokens, text.tokens, text.mask)
        return s_t

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(
        self,
        lr: float,
        lr_ratio: float,
        optimizer: str = "adam",
        weight_decay: float | None = None,
    ) -> torch.optim.Optimizer:
        """The official optimiser: head groups from :meth:`SSNHead.param_groups`, the backbone at lr·ratio.

        ``adam`` (CIRR recipe) or ``adamw`` (FashionIQ recipe: the CLIP group uses betas (0.9, 0.999)
        and eps 1e-4).  weight_decay None keeps the optimiser's default (0 for Adam, 0.01 for AdamW).
        """
        groups = self.head.param_groups(lr, lr_ratio)
        backbone_group: dict[str, Any] = {"name": "backbone", "params": list(self.backbone.parameters()), "lr": lr * lr_ratio}
        kwargs: dict[str, Any] = {"lr": lr}
        if weight_decay is not None:
            kwargs["weight_decay"] = weight_decay
        if optimizer == "adam":
            optimizer_class = torch.optim.Adam
        elif optimizer == "adamw":
            optimizer_class = torch.optim.AdamW
            backbone_group.update(betas=(0.9, 0.999), eps=1e-4)
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose 'adam' or 'adamw'")
        return optimizer_class(groups + [backbone_group], **kwargs)

    @property
    def vision_tower_trainable(self) -> bool:
        return any(p.requires_grad for p in self.backbone.vision_tower.parameters())

    def freeze_vision_tower(self) -> None:
        """FashionIQ recipe: only the text tower and the head are fine-tuned after the first epoch."""
        for param in self.backbone.vision_tower.parameters():
            param.requires_grad_(False)

    # ------------------------------------------------------------------ checkpoints
    def config(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this model without any other input.

        A backbone built from a Hugging Face CLIP directory also records its open_clip model config
        (``open_clip_config``), since its name ``hf-clip-<digest>`` is known to open_clip only once registered.
        """
        open_clip_config = hf_clip.registered_config(self.backbone.model_name)
        return {**self.backbone.describe(), "nhead": self.nhead,
                **({"open_clip_config": open_clip_config} if open_clip_config is not None else {})}


def build_ssn_model(
    clip_model_name: str,
    pretrained: str | None = None,
    nhead: int = 8,
    device: torch.device | str = "cpu",
    quick_gelu: bool | None = None,
) -> SSNModel:
    """Backbone from open_clip (name + pretrained tag or local file) and a freshly initialised head.

    ``quick_gelu`` None lets the activation follow the weights (:func:`model.backbone.resolve_quick_gelu`).
    """
    backbone = create_backbone(clip_model_name, pretrained=pretrained, device=device, quick_gelu=quick_gelu)
    return SSNModel(backbone, nhead=nhead).to(device)


def complete_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """A saved :meth:`SSNModel.config` with the keys older checkpoints lack filled in as they were trained.

    ``quick_gelu`` (added later): older code built the model config's own activation, i.e. GELU unless the
    name ends in ``-quickgelu``.
    """
    if "quick_gelu" in config or "clip_model_name" not in config:
        return config
    return {**config, "quick_gelu": resolve_quick_gelu(config["clip_model_name"])}


def check_model_config(saved: dict[str, Any], current: dict[str, Any], source: str) -> None:
    """Raise CheckpointMismatchError naming every difference between two :meth:`SSNModel.config` dicts."""
    saved = complete_model_config(saved)
    differences = [
        f"{key}: checkpoint has {saved.get(key)!r}, model has {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if differences:
        raise CheckpointMismatchError(
            f"{source} was made for another model ({saved.get('clip_model_name')} with text width "
            f"{saved.get('text_width')}, this model is {current.get('clip_model_name')} with "
            f"{current.get('text_width')}): " + "; ".join(differences)
        )


def check_state_dict(model: nn.Module, state_dict: dict[str, Tensor], source: str, max_listed: int = 5) -> None:
    """Raise CheckpointMismatchError naming missing, unexpected and differently shaped weights.

    The check :meth:`nn.Module.load_state_dict` would make, as one short message instead of a stack of
    every key (a checkpoint whose ``model_config`` does not describe its weights).
    """
    own = model.state_dict()
    problems = [
        f"{key}: checkpoint {tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}, "
        f"model {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if key in own and not (isinstance(value, Tensor) and value.shape == own[key].shape)
    ]
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    if missing:
        problems.append(f"{len(missing)} weight(s) missing, e.g. {missing[:max_listed]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weight(s), e.g. {unexpected[:max_listed]}")
    if problems:
        shown = problems[:max_listed] + ([f"... {len(problems) - max_listed} more"] if len(problems) > max_listed else [])
        raise CheckpointMismatchError(f"{source}: the weights do not fit the model ({len(problems)} problem(s)): "
                                      + "; ".join(shown))


def ssn_model_from_checkpoint(checkpoint: dict[str, Any], device: torch.device | str = "cpu", source: str = "checkpoint") -> SSNModel:
    """Rebuild an SSNModel from a training checkpoint alone (nanoGPT ``sample.py`` style)."""
    if "model_config" not in checkpoint or "model" not in checkpoint:
        raise CheckpointMismatchError(f"{source} is not an SSN training checkpoint (no model_config / model)")
    config = checkpoint["model_config"]
    missing = [key for key in ("clip_model_name", "nhead") if key not in config]
    if missing:
        raise CheckpointMismatchError(f"{source}: model_config lacks {', '.join(missing)}")
    if "open_clip_config" in config:  # a backbone made from a Hugging Face CLIP directory (model/hf_clip.py)
        try:
            hf_clip.register_model_config(config["open_clip_config"], name=config["clip_model_name"])
        except hf_clip.HFCLIPError as exc:
            raise CheckpointMismatchError(f"{source}: {exc}") from exc
    config = complete_model_config(config)
    model = build_ssn_model(config["clip_model_name"], pretrained=None, nhead=config["nhead"], device=device,
                            quick_gelu=config["quick_gelu"])
    check_model_config(config, model.config(), source)
    check_state_dict(model, checkpoint["model"], source)
    model.load_state_dict(checkpoint["model"])
    return model
