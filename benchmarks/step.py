"""Training-step and inference benchmark: the SSN step against a backbone-only step and the official step.

SSN step: ``SSNModel.forward`` (one vision pass for references and targets, one text pass, the head),
``ssn_loss``, backward and an optimiser step.  Backbone-only step: the same backbone encodes the same
two image batches (in one pass, as SSN does) and the same captions (cut to the batch's longest caption,
as SSN does), and a symmetric contrastive loss is taken between ``normalize(e_img_r + e_txt)`` and
``normalize(e_img_t)``, then backward and an Adam step.  The difference is the SSN head's overhead.
Official step: the official training step re-stated on the same model and inputs: two separate vision
passes (references, then targets), the same captions, the official head forward
(:mod:`benchmarks.official_head`: full sequence-first encoder, one pass per branch) and the official
probability-target loss, then backward and an Adam step with the official parameter groups.
Inference: gallery images encoded per second (SSN target feature vs plain image embedding) and queries
encoded and ranked per second against a gallery.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model import SSNModel, build_ssn_model, ssn_loss
from retrieval import topk_retrieval

from .common import interleaved_medians, peak_memory_bytes, reset_peak_memory
from .official_head import official_compose, official_ssn_loss, official_target

CAPTIONS = (
    "is red and has no people in the background",
    "make the dog bigger and put it on a sofa",
    "same shirt but with long sleeves and a darker colour",
    "replace the cat with two birds",
)
CONTRASTIVE_SCALE = 100.0


@dataclass(frozen=True)
class StepResult:
    batch_size: int
    ssn_step_s: float
    backbone_step_s: float
    official_step_s: float
    ssn_peak_bytes: int  # CUDA max allocated during SSN steps; CPU peak RSS after the SSN warm-up
    peak_bytes: int  # peak over the whole measurement
    ssn_gallery_s: float  # per batch of gallery images
    backbone_gallery_s: float
    ssn_query_s: float  # per batch of queries, encoded and ranked
    backbone_query_s: float
    rank_gallery_size: int

    @property
    def ssn_triplets_per_s(self) -> float:
        return self.batch_size / self.ssn_step_s

    @property
    def backbone_triplets_per_s(self) -> float:
        return self.batch_size / self.backbone_step_s

    @property
    def head_overhead(self) -> float:
        """SSN step time over backbone-only step time, minus one (0.05 = 5 % slower)."""
        return self.ssn_step_s / self.backbone_step_s - 1

    @property
    def official_ratio(self) -> float:
        """SSN step time over the official step time (0.9 = 10 % faster than the official step)."""
        return self.ssn_step_s / self.official_step_s


def synthetic_batch(model: SSNModel, batch_size: int, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """Random images and real-looking captions (tokenised and cut to the batch's longest caption)."""
    gen = torch.Generator().manual_seed(seed)
    size = model.backbone.image_size
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    return {
        "reference": torch.randn(batch_size, 3, size, size, generator=gen).to(device),
        "target": torch.randn(batch_size, 3, size, size, generator=gen).to(device),
        "token_ids": model.backbone.tokenize(captions).to(device),
    }


def backbone_contrastive_loss(model: SSNModel, reference: Tensor, target: Tensor, token_ids: Tensor) -> Tensor:
    """The baseline objective: symmetric InfoNCE between image+text sums and target embeddings."""
    batch = reference.shape[0]
    images = model.backbone.encode_image(torch.cat([reference, target])).embeds
    text = model.backbone.encode_text(token_ids).embeds
    queries = F.normalize(F.normalize(images[:batch], dim=-1) + F.normalize(text, dim=-1), dim=-1)
    targets = F.normalize(images[batch:], dim=-1)
    logits = CONTRASTIVE_SCALE * queries @ targets.T
    labels = torch.arange(batch, device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def official_step_loss(model: SSNModel, reference: Tensor, target: Tensor, token_ids: Tensor) -> Tensor:
    """The official training objective on our backbone: separate reference and target vision passes,
    the official head forward and the official probability-target loss."""
    ref = model.backbone.encode_image(reference)
    tgt = model.backbone.encode_image(target)
    text = model.backbone.encode_text(token_ids)
    q_pos, q_neg = official_compose(model.head, ref.tokens, ref.embeds, text.tokens, text.embeds, text.mask)
    return official_ssn_loss(q_pos, q_neg, official_target(model.head, tgt.tokens, tgt.embeds))


def check_official_step_equal(model: SSNModel, batch: dict[str, Tensor], samples: int = 4, rtol: float = 1e-4) -> float:
    """Assert that our loss and the official step's loss agree on the first ``samples`` triplets; return
    the absolute difference.

    Eval mode (dropout off) and one caption repeated, so that no caption is padded: the official fusion
    layer attends to padding, ours masks it, and on unpadded input the two are the same computation.
    """
    was_training = model.training
    model.eval()
    token_ids = batch["token_ids"][:1].expand(samples, -1)
    token_ids = token_ids[:, : int(model.backbone.text_mask(token_ids[:1]).sum())]
    reference, target = batch["reference"][:samples], batch["target"][:samples]
    try:
        with torch.no_grad():
            ours = ssn_loss(*model(reference, target, token_ids)).item()
            official = official_step_loss(model, reference, target, token_ids).item()
    finally:
        model.train(was_training)
    diff = abs(ours - official)
    if diff > rtol * max(1.0, abs(official)):
        raise AssertionError(f"our loss {ours} differs from the official step's loss {official}")
    return diff


def run_step_benchmark(
    clip_model_name: str = "ViT-Tiny-P8-32",
    pretrained: str | None = None,
    batch_size: int = 64,
    steps: int = 5,
    device: torch.device | str = "cpu",
    rank_gallery_size: int = 2265,
    seed: int = 0,
    grad_checkpointing: bool = False,
) -> StepResult:
    """Median times of the SSN, backbone-only and official training steps and of inference, measured
    interleaved.  All three steps train the same model on the same batch with their own Adam optimiser
    (the SSN and official steps with the official parameter groups).  ``grad_checkpointing`` recomputes
    the backbone's blocks in the backward pass of every step (``--grad_checkpointing`` of training)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_ssn_model(clip_model_name, pretrained=pretrained, device=device).train()
    model.backbone.set_grad_checkpointing(grad_checkpointing)
    batch = synthetic_batch(model, batch_size, device, seed)
    check_official_step_equal(model, batch, samples=min(4, batch_size))
    ssn_optimizer = model.configure_optimizers(lr=1e-6, lr_ratio=0.2)
    official_optimizer = model.configure_optimizers(lr=1e-6, lr_ratio=0.2)
    backbone_optimizer = torch.optim.Adam(model.backbone.parameters(), lr=1e-6 * 0.2)

    def ssn_step() -> None:
        ssn_optimizer.zero_grad(set_to_none=True)
        ssn_loss(*model(batch["reference"], batch["target"], batch["token_ids"])).backward()
        ssn_optimizer.step()

    def backbone_step() -> None:
        backbone_optimizer.zero_grad(set_to_none=True)
        backbone_contrastive_loss(model, batch["reference"], batch["target"], batch["token_ids"]).backward()
        backbone_optimizer.step()

    def official_step() -> None:
        official_optimizer.zero_grad(set_to_none=True)
        official_step_loss(model, batch["reference"], batch["target"], batch["token_ids"]).backward()
        official_optimizer.step()

    reset_peak_memory(device)
    ssn_step()  # warm-up; also allocates the SSN optimiser state
    ssn_peak = peak_memory_bytes(device)
    steps_s = interleaved_medians({"ssn": ssn_step, "backbone": backbone_step, "official": official_step}, steps, device)
    peak = peak_memory_bytes(device)
    for optimizer in (ssn_optimizer, backbone_optimizer, official_optimizer):
        optimizer.zero_grad(set_to_none=True)

    model.eval()
    gallery = F.normalize(torch.randn(rank_gallery_size, model.backbone.embed_dim, generator=torch.Generator().manual_seed(seed)), dim=-1).to(device)

    def query_and_rank(method: str) -> None:
        queries = model.encode_query(batch["reference"], batch["token_ids"], method)
        topk_retrieval(queries, gallery, k=50)

    with torch.no_grad():
        inference_s = interleaved_medians(
            {
                "ssn_gallery": lambda: model.encode_gallery(batch["target"], "ssn"),
                "backbone_gallery": lambda: model.encode_gallery(batch["target"], "image"),
                "ssn_query": lambda: query_and_rank("ssn"),
                "backbone_query": lambda: query_and_rank("sum"),
            },
            steps, device,
        )
    return StepResult(
        batch_size=batch_size,
        ssn_step_s=steps_s["ssn"],
        backbone_step_s=steps_s["backbone"],
        official_step_s=steps_s["official"],
        ssn_peak_bytes=ssn_peak,
        peak_bytes=max(peak, peak_memory_bytes(device)),
        ssn_gallery_s=inference_s["ssn_gallery"],
        backbone_gallery_s=inference_s["backbone_gallery"],
        ssn_query_s=inference_s["ssn_query"],
        backbone_query_s=inference_s["backbone_query"],
        rank_gallery_size=rank_gallery_size,
    )
