"""Retrieval methods over one model: how a query and a gallery image become comparable features.

A :class:`Retriever` maps a batch of (reference image, caption) to query features and a batch of
gallery images to gallery features, both L2-normalised [B, D], so that the cosine similarity is a dot
product.  ``"ssn"`` is the Semantic Shift Network; ``"image"``, ``"text"`` and ``"sum"`` are the
backbone-only baselines SSN is compared with.  :func:`register_retriever` adds a method by name
(``validate.py --baselines`` scores every registered one).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # only for annotations: the model module imports this one
    from .ssn_model import SSNModel

__all__ = ["Retriever", "SSNRetriever", "ImageRetriever", "TextRetriever", "SumRetriever", "RETRIEVERS",
           "register_retriever", "get_retriever"]


class Retriever:
    """One retrieval method: query features from (reference image, caption), gallery features from images.

    Subclasses set :attr:`name` and implement both methods; gallery features default to the backbone's
    normalised image embedding, which every baseline ranks against.
    """

    name: str = ""

    def encode_query(self, model: SSNModel, reference_images: Tensor, token_ids: Tensor) -> Tensor:
        """reference_images [B, 3, H, W], token_ids [B, L] -> normalised query features [B, D]."""
        raise NotImplementedError

    def encode_gallery(self, model: SSNModel, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> normalised gallery features [B, D]: ``f_v(image) / ||f_v(image)||``."""
        return F.normalize(model.backbone.encode_image(images).embeds, dim=-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class SSNRetriever(Retriever):
    """SSN: the composed query q⁺ of the head, against the head's target feature t (docs/ssn.md)."""

    name = "ssn"

    def encode_query(self, model: SSNModel, reference_images: Tensor, token_ids: Tensor) -> Tensor:
        image = model.backbone.encode_image(reference_images)
        text = model.backbone.encode_text(token_ids)
        return model.head.compose_query(image.tokens, image.embeds, text.tokens, text.embeds, text.mask)

    def encode_gallery(self, model: SSNModel, images: Tensor) -> Tensor:
        features = model.backbone.encode_image(images)
        return model.head.encode_target(features.tokens, features.embeds)


class ImageRetriever(Retriever):
    """Baseline: the reference image's embedding alone, ``f_v(I_r) / ||f_v(I_r)||`` (caption ignored)."""

    name = "image"

    def encode_query(self, model: SSNModel, reference_images: Tensor, token_ids: Tensor) -> Tensor:
        return F.normalize(model.backbone.encode_image(reference_images).embeds, dim=-1)


class TextRetriever(Retriever):
    """Baseline: the caption's embedding alone, ``f_t(T) / ||f_t(T)||`` (reference image ignored)."""

    name = "text"

    def encode_query(self, model: SSNModel, reference_images: Tensor, token_ids: Tensor) -> Tensor:
        return F.normalize(model.backbone.encode_text(token_ids).embeds, dim=-1)


class SumRetriever(Retriever):
    """Baseline: the sum of both normalised embeddings, renormalised:
    ``normalize(f_v(I_r) / ||f_v(I_r)|| + f_t(T) / ||f_t(T)||)``."""

    name = "sum"

    def encode_query(self, model: SSNModel, reference_images: Tensor, token_ids: Tensor) -> Tensor:
        image = F.normalize(model.backbone.encode_image(reference_images).embeds, dim=-1)
        text = F.normalize(model.backbone.encode_text(token_ids).embeds, dim=-1)
        return F.normalize(image + text, dim=-1)


RETRIEVERS: dict[str, Retriever] = {}


def register_retriever(retriever: Retriever) -> Retriever:
    """Add ``retriever`` to :data:`RETRIEVERS` under its (new, non-empty) name."""
    if not retriever.name:
        raise ValueError(f"{retriever!r} has no name")
    if retriever.name in RETRIEVERS:
        raise ValueError(f"retrieval method {retriever.name!r} is already registered")
    RETRIEVERS[retriever.name] = retriever
    return retriever


def get_retriever(name: str | Retriever) -> Retriever:
    """The registered retriever called ``name`` (a :class:`Retriever` is returned as it is)."""
    if isinstance(name, Retriever):
        return name
    if name not in RETRIEVERS:
        raise ValueError(f"unknown retrieval method {name!r}; choose from {tuple(RETRIEVERS)}")
    return RETRIEVERS[name]


for _retriever in (SSNRetriever(), ImageRetriever(), TextRetriever(), SumRetriever()):
    register_retriever(_retriever)
