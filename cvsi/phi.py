"""LinCIR's mapping network Φ: a CLIP image embedding ``q_v`` [B, D] -> a pseudo word embedding [B, w].

The parameter names (``layers.0``, ``layers.3``, ``layers.6``) and the checkpoint layout
(``{"epoch": global step, "Phi": state_dict}``) are those of LinCIR's training script, which the CVSI
release uses too, so LinCIR's ``lincir_large.pt`` (ViT-L/14) and the CVSI release's
``phi_best_base_openai.pt`` (ViT-B/32) and ``phi_best_giga_openclip.pt`` (ViT-bigG/14) load unchanged;
docs/cvsi.md lists which backbone each fits.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from checkpoint import load_weights_only
from utils import UserError, atomic_torch_save

__all__ = ["Phi", "PhiCheckpointError", "PHI_STATE_KEY", "load_phi", "save_phi"]

PHI_STATE_KEY = "Phi"  # LinCIR saves {"epoch": ..., "Phi": state_dict}
_HIDDEN_MULTIPLIER = 4  # LinCIR: hidden width = 4 * CLIP embedding dim


class PhiCheckpointError(UserError, ValueError):
    """A Φ checkpoint file is missing, unreadable, or does not fit the backbone."""


class Phi(nn.Module):
    """Φ: Linear(D, 4D) - GELU - Dropout - Linear(4D, 4D) - GELU - Dropout - Linear(4D, w).

    Args:
        input_dim: D, the CLIP joint embedding dimension (the input is the projected image
            embedding *before* L2 normalisation, as in the LinCIR and CVSI releases).
        output_dim: w, the text tower's token width (the pseudo word replaces a word embedding).
        hidden_dim: defaults to 4 * D.
        dropout: dropout probability (active only in training mode).
    """

    def __init__(self, input_dim: int, output_dim: int, hidden_dim: int | None = None, dropout: float = 0.5) -> None:
        super().__init__()
        hidden_dim = hidden_dim or _HIDDEN_MULTIPLIER * input_dim
        self.input_dim, self.output_dim, self.hidden_dim = input_dim, output_dim, hidden_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, image_embeds: Tensor) -> Tensor:
        """image_embeds [B, D] -> pseudo word embeddings [B, w]."""
        return self.layers(image_embeds)


def _state_dict_from(obj: Any, path: Path) -> dict[str, Tensor]:
    """The Φ state dict inside a loaded checkpoint: LinCIR's ``{"Phi": ...}``, or a bare state dict."""
    if isinstance(obj, Mapping) and isinstance(obj.get(PHI_STATE_KEY), Mapping):
        obj = obj[PHI_STATE_KEY]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        keys = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise PhiCheckpointError(
            f"Φ checkpoint {path}: expected LinCIR's {{'{PHI_STATE_KEY}': state_dict}} or a bare state dict "
            f"of tensors, found {keys}"
        )
    # Checkpoints saved from a DistributedDataParallel / accelerate wrapper carry a "module." prefix.
    return {key.removeprefix("module."): value for key, value in obj.items()}


def load_phi(
    path: str | os.PathLike, input_dim: int, output_dim: int, map_location: str | torch.device = "cpu"
) -> Phi:
    """Build Φ for a backbone with embedding dim ``input_dim`` (D) and text width ``output_dim`` (w)
    and load a LinCIR checkpoint into it; returned in eval mode.

    Raises:
        PhiCheckpointError: missing or unreadable file, wrong layout, missing / unexpected parameters,
            or shapes that belong to another CLIP (the message says which D and w the file was
            trained for).
    """
    path = Path(path)
    obj = load_weights_only(path, PhiCheckpointError, "Φ checkpoint", map_location)
    state = _state_dict_from(obj, path)
    phi = Phi(input_dim, output_dim)
    expected = phi.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise PhiCheckpointError(
            f"Φ checkpoint {path}: parameter names do not match LinCIR's Φ "
            f"(missing {missing}, unexpected {unexpected})"
        )
    wrong = [
        f"{key}: file {tuple(state[key].shape)}, expected {tuple(value.shape)}"
        for key, value in expected.items()
        if state[key].shape != value.shape
    ]
    if wrong:
        trained_for = (state["layers.0.weight"].shape[1], state["layers.6.weight"].shape[0])
        raise PhiCheckpointError(
            f"Φ checkpoint {path} was trained for a CLIP with embedding dim D={trained_for[0]} and text width "
            f"w={trained_for[1]}; this backbone has D={input_dim}, w={output_dim} ({'; '.join(wrong)})"
        )
    phi.load_state_dict(state)
    return phi.eval()


def save_phi(path: str | os.PathLike, phi: Phi, epoch: int = 0) -> None:
    """Atomically write Φ in LinCIR's checkpoint layout ``{"epoch": epoch, "Phi": state_dict}``."""
    atomic_torch_save(path, {"epoch": epoch, PHI_STATE_KEY: phi.state_dict()})
