"""The official SSN ``Model`` (starxing-yuu/SSN, ``src/models/ssn.py``) and its optimiser, re-stated: the
anchor of the training-step benchmark and the model of the official-checkpoint fidelity tests.

Structure and names follow the official class, so its ``state_dict`` has the official checkpoint's keys:
the Hugging Face towers as ``clip_text_model`` (``CLIPTextModelWithProjection``) and ``clip_vision_model``
(``CLIPVisionModelWithProjection``), and the head's modules at top level (``token_type_embeddings``,
``text_token_selection_mask``, ``image_token_selection_mask``, ``image_token_proj_layer``,
``fusion_layer`` = a one-layer ``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer(width, nhead=8)``,
``combiner_layer``, ``output_layer``, ``dynamic_scalar``).  The official constructor reads the towers with
``from_pretrained`` and its widths from ``args.projection_dim`` / ``args.hidden_dim``; here they are passed in.

The forward runs the official steps: the towers on ``input_ids`` + ``attention_mask``; the head on the
vision ``last_hidden_state`` (before ``post_layernorm``), the text ``last_hidden_state`` (after
``final_layer_norm``) and the projected ``image_embeds`` / ``text_embeds``; the head math and the loss are
the step-by-step re-statement in :mod:`benchmarks.official_head` (sequence-first encoder over every token,
one pass per branch, probability-target KL).  :func:`official_optimizer` is the official ``train_cirr.py``
Adam with its five parameter groups.  One fix, as in the project: the number of image tokens is
read from the vision tower instead of the official hard-coded 50 (ViT-B/32 at 224 px only).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from .official_head import official_compose, official_ssn_loss, official_target


class OfficialSSN(nn.Module):
    """The official ``Model``: Hugging Face CLIP towers + the SSN head.

    Args:
        clip_text_model, clip_vision_model: the Hugging Face towers (official: ``from_pretrained``).
        projection_dim: official ``--projection_dim`` (the combiner works on ``2·projection_dim``).
        hidden_dim: official ``--hidden_dim``, the head width (token types, selection masks, fusion layer).
        kl_weight: weight of the KL terms of the loss.
    """

    def __init__(
        self,
        clip_text_model: CLIPTextModelWithProjection,
        clip_vision_model: CLIPVisionModelWithProjection,
        projection_dim: int,
        hidden_dim: int,
        kl_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.clip_text_model = clip_text_model
        self.clip_vision_model = clip_vision_model
        feature_dim = clip_vision_model.visual_projection.out_features  # D
        image_token_dim = clip_vision_model.visual_projection.in_features  # d_img
        width = hidden_dim
        combined = 2 * projection_dim
        self.kl_weight = kl_weight

        self.token_type_embeddings = nn.Embedding(2, width)  # 0: reference image token, 1: text token
        self.text_token_selection_mask = nn.Sequential(nn.Linear(2 * width, 1), nn.Sigmoid())
        self.image_token_selection_mask = nn.Sequential(nn.Linear(2 * width, 1), nn.Sigmoid())
        self.image_token_proj_layer = nn.Linear(image_token_dim, width)
        with warnings.catch_warnings():  # torch's note on the nested-tensor fast path of a post-norm layer
            warnings.simplefilter("ignore", UserWarning)
            self.fusion_layer = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model=width, nhead=8), num_layers=1)
        self.combiner_layer = nn.Linear(combined, combined)
        self.output_layer = nn.Linear(combined, feature_dim)
        self.dynamic_scalar = nn.Sequential(nn.Linear(combined, combined), nn.ReLU(), nn.Linear(combined, 1), nn.Sigmoid())

    def features(
        self, reference_images: Tensor, input_ids: Tensor, attention_mask: Tensor, target_images: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(q⁺, q⁻, t)`` [B, D] the official forward computes before its loss."""
        text = self.clip_text_model(input_ids=input_ids, attention_mask=attention_mask)
        reference = self.clip_vision_model(pixel_values=reference_images)
        target = self.clip_vision_model(pixel_values=target_images)
        q_pos, q_neg = official_compose(
            self, reference.last_hidden_state, reference.image_embeds, text.last_hidden_state, text.text_embeds,
            attention_mask.to(text.last_hidden_state.dtype),
        )
        return q_pos, q_neg, official_target(self, target.last_hidden_state, target.image_embeds)

    def forward(self, reference_images: Tensor, input_ids: Tensor, attention_mask: Tensor, target_images: Tensor) -> Tensor:
        """The official training loss of a batch (ground truth: the i-th target for the i-th query)."""
        return official_ssn_loss(*self.features(reference_images, input_ids, attention_mask, target_images), self.kl_weight)

    def save_official(self, path, epoch: int) -> None:
        """Save as the official ``save_model`` does: ``{'epoch': e, <class name 'Model'>: state_dict}``."""
        torch.save({"epoch": epoch, "Model": self.state_dict()}, path)


def official_optimizer(model: nn.Module, lr: float, lr_ratio: float) -> torch.optim.Adam:
    """The official ``train_cirr.py`` optimiser: Adam over five groups chosen by parameter name (``clip`` ->
    backbone at lr·ratio; ``token_proj`` -> lr·ratio·2; ``token_type`` and ``fusion`` / ``token_selection``
    -> lr·ratio·4; the rest of the head at lr), in the official order of the checks."""
    groups: dict[str, list[nn.Parameter]] = {"head": [], "fusion": [], "modality": [], "proj": [], "clip": []}
    for name, param in model.named_parameters():
        if "clip" in name:
            groups["clip"].append(param)
        elif "token_proj" in name:
            groups["proj"].append(param)
        elif "token_type" in name:
            groups["modality"].append(param)
        elif "fusion" in name or "token_selection" in name:
            groups["fusion"].append(param)
        else:
            groups["head"].append(param)
    return torch.optim.Adam([
        {"params": groups["head"]},
        {"params": groups["fusion"], "lr": lr * lr_ratio * 4},
        {"params": groups["modality"], "lr": lr * lr_ratio * 4},
        {"params": groups["proj"], "lr": lr * lr_ratio * 2},
        {"params": groups["clip"], "lr": lr * lr_ratio},
    ], lr=lr)
