"""Official SSN checkpoints (starxing-yuu/SSN) -> this project's model and checkpoint format.

The official training scripts save ``{'epoch': e, 'Model': model.state_dict()}`` (the key is the class
name), with e the 0-based epoch just trained.  The state dict holds the Hugging Face towers under
``clip_text_model.text_model.*``, ``clip_text_model.text_projection.weight``,
``clip_vision_model.vision_model.*`` and ``clip_vision_model.visual_projection.weight``, and the head's
parameters at top level under the names :class:`model.SSNHead` keeps (``token_type_embeddings``,
``fusion_layer.layers.0.*``, ...).  Conversion: towers through :mod:`model.hf_clip` into the open_clip
backbone, head weights copied by name, the architecture from the Hugging Face ``config.json`` the model
was trained from (or, for OpenAI's ViT-B/32, B/16, L/14 sizes, from the weights' shapes).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from utils import UserError

from . import hf_clip
from .ssn_model import CheckpointMismatchError, SSNModel, build_ssn_model, check_state_dict

OFFICIAL_MODEL_KEY = "Model"


class OfficialCheckpointError(UserError, ValueError):
    """A file that is not an official SSN checkpoint, or whose weights do not fit the given config."""


def official_state_dict(checkpoint: Any, source: str) -> tuple[dict[str, Tensor], int | None]:
    """The ``Model`` state dict and the epoch of an official checkpoint, checked."""
    if isinstance(checkpoint, Mapping) and "model_config" in checkpoint:
        raise OfficialCheckpointError(f"{source}: already a checkpoint of this project (it has model_config)")
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get(OFFICIAL_MODEL_KEY), Mapping):
        keys = sorted(map(str, checkpoint))[:5] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise OfficialCheckpointError(
            f"{source}: not an official SSN checkpoint (expected {{'epoch': e, 'Model': state_dict}}, found {keys})"
        )
    state = dict(checkpoint[OFFICIAL_MODEL_KEY])
    not_tensors = [key for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise OfficialCheckpointError(f"{source}: 'Model' holds non-tensors, e.g. {not_tensors[:3]}")
    if not any(key.startswith(hf_clip.OFFICIAL_PREFIXES) for key in state):
        raise OfficialCheckpointError(
            f"{source}: no clip_text_model.* / clip_vision_model.* weights; not an official SSN checkpoint"
        )
    epoch = checkpoint.get("epoch")
    return state, epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def ssn_model_from_official(
    official_state: Mapping[str, Tensor],
    hf_config: Mapping[str, Any] | None = None,
    source: str = "official checkpoint",
    config_source: str = "config.json",
    device: torch.device | str = "cpu",
) -> SSNModel:
    """The project's :class:`SSNModel` holding an official model's weights.

    Args:
        official_state: the official ``Model`` state dict (:func:`official_state_dict`).
        hf_config: the Hugging Face ``CLIPConfig`` dict the official model was built from; None derives it
            from the weights for OpenAI's CLIP sizes (:func:`model.hf_clip.openai_hf_config`).
        source, config_source: names of the two inputs for error messages.

    Raises:
        OfficialCheckpointError: the config cannot be built by open_clip, or the weights do not fit it
            (naming both files and the first differing weights).
    """
    towers = {k: v for k, v in official_state.items() if k.startswith(hf_clip.OFFICIAL_PREFIXES)}
    head = {k: v for k, v in official_state.items() if k not in towers}
    try:
        if hf_config is None:
            hf_config, config_source = hf_clip.openai_hf_config(towers, source), "the weights' OpenAI size"
        model_cfg = hf_clip.open_clip_model_config(hf_config, config_source)
        backbone_state = hf_clip.hf_to_open_clip_state_dict(towers, source)
        hf_clip.check_fits(backbone_state, model_cfg, f"{source} with {config_source}")
    except hf_clip.HFCLIPError as exc:
        raise OfficialCheckpointError(str(exc)) from exc
    model = build_ssn_model(hf_clip.register_model_config(model_cfg), device=device)
    try:
        check_state_dict(model.head, head, f"{source} (SSN head)")
    except CheckpointMismatchError as exc:
        raise OfficialCheckpointError(str(exc)) from exc
    model.backbone.clip.load_state_dict(backbone_state)
    model.head.load_state_dict(head)
    return model


def converted_checkpoint(
    model: SSNModel, dataset: str, official_epoch: int | None, args: Mapping[str, Any]
) -> dict[str, Any]:
    """An inference checkpoint in the training format (``model_config``, ``model``, ``dataset``, ``args``,
    ``epoch`` = epochs trained), which ``validate.py``, ``cirr_test_submission.py`` and ``retrieve.py`` read
    and ``ssn_model_from_checkpoint`` rebuilds.  It holds no optimiser state: it cannot be ``--resume``\\ d."""
    return {
        "dataset": dataset,
        "model_config": model.config(),
        "model": model.state_dict(),
        "epoch": official_epoch + 1 if official_epoch is not None else 0,
        "args": {"clip_model_name": model.backbone.model_name, "nhead": model.nhead, **args},
    }
