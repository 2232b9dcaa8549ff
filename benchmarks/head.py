"""Head-only benchmark: our SSN head against the official forward, same weights and inputs.

Both compute ``(q⁺, q⁻, t)`` and the SSN loss, then backpropagate into the head parameters and the
input features (as in training, where the backbone receives those gradients).  Before timing, the
outputs and every gradient are checked to agree (eval mode: dropout off; all-ones text mask, where the
two forwards have identical math).  The timing runs in train mode, as in training.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from model import SSNHead, ssn_loss

from .common import interleaved_medians
from .official_head import official_compose, official_target

# ViT-B/32 at 224 px: 1 + 49 image tokens of width 768; text width = embedding size = 512.
VIT_B32_SHAPES = {"image_tokens": 50, "image_token_dim": 768, "text_width": 512, "text_len": 20}


@dataclass(frozen=True)
class HeadResult:
    ours_s: float  # median seconds of forward + backward, our head
    official_s: float  # same, the official forward
    max_abs_diff: float  # largest difference of outputs and gradients in the equality check

    @property
    def ratio(self) -> float:
        return self.ours_s / self.official_s


def head_inputs(
    batch: int, image_tokens: int, image_token_dim: int, text_width: int, text_len: int, seed: int = 0
) -> dict[str, Tensor]:
    """Random backbone features of the given shapes (leaf tensors that require gradients)."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).requires_grad_(True)

    return {
        "ref_tokens": leaf(batch, image_tokens, image_token_dim),
        "ref_embed": leaf(batch, text_width),
        "text_tokens": leaf(batch, text_len, text_width),
        "text_embed": leaf(batch, text_width),
        "text_mask": torch.ones(batch, text_len),
        "tgt_tokens": leaf(batch, image_tokens, image_token_dim),
        "tgt_embed": leaf(batch, text_width),
    }


def _ours(head: SSNHead, x: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    q_pos, q_neg = head.compose(x["ref_tokens"], x["ref_embed"], x["text_tokens"], x["text_embed"], x["text_mask"])
    return q_pos, q_neg, head.encode_target(x["tgt_tokens"], x["tgt_embed"])


def _official(head: SSNHead, x: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    q_pos, q_neg = official_compose(head, x["ref_tokens"], x["ref_embed"], x["text_tokens"], x["text_embed"], x["text_mask"])
    return q_pos, q_neg, official_target(head, x["tgt_tokens"], x["tgt_embed"])


Forward = Callable[[SSNHead, dict[str, Tensor]], tuple[Tensor, Tensor, Tensor]]


def _forward_backward(head: SSNHead, x: dict[str, Tensor], forward: Forward) -> tuple[list[Tensor], list[Tensor]]:
    """Outputs and gradients (head parameters, then inputs) of one forward + backward."""
    leaves = list(head.parameters()) + [v for v in x.values() if v.requires_grad]
    for leaf in leaves:
        leaf.grad = None
    outputs = forward(head, x)
    ssn_loss(*outputs).backward()
    return [o.detach() for o in outputs], [leaf.grad.clone() for leaf in leaves]


def check_equal(head: SSNHead, x: dict[str, Tensor], atol: float = 1e-5) -> float:
    """Assert that our head and the official forward give the same outputs and gradients; return the
    largest absolute difference."""
    was_training = head.training
    head.eval()
    try:
        ours = _forward_backward(head, x, _ours)
        official = _forward_backward(head, x, _official)
    finally:
        head.train(was_training)
    max_diff = 0.0
    for kind, a_list, b_list in (("output", ours[0], official[0]), ("gradient", ours[1], official[1])):
        for index, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
            diff = (a - b).abs().max().item()
            scale = max(1.0, b.abs().max().item())
            if diff > atol * scale:
                raise AssertionError(f"{kind} {index} differs from the official head by {diff:.3g}")
            max_diff = max(max_diff, diff)
    return max_diff


def run_head_benchmark(batch: int = 32, repeats: int = 10, seed: int = 0, **shapes: int) -> HeadResult:
    """Median forward + backward time of our head and of the official forward (ViT-B/32 shapes by default)."""
    dims = {**VIT_B32_SHAPES, **shapes}
    torch.manual_seed(seed)
    head = SSNHead(dims["image_token_dim"], dims["text_width"], dims["text_width"])
    x = head_inputs(batch, dims["image_tokens"], dims["image_token_dim"], dims["text_width"], dims["text_len"], seed)
    max_diff = check_equal(head, x)
    head.train()
    device = torch.device("cpu")
    medians = interleaved_medians(
        {"ours": lambda: _forward_backward(head, x, _ours), "official": lambda: _forward_backward(head, x, _official)},
        repeats, device,
    )
    return HeadResult(ours_s=medians["ours"], official_s=medians["official"], max_abs_diff=max_diff)
