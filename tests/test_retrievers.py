"""Tests for model/retrievers.py: each method's formula from the backbone and head outputs, the registry, and
SSNModel dispatching to it."""
import pytest
import torch
import torch.nn.functional as F

from model import RETRIEVAL_METHODS, RETRIEVERS, Retriever, build_ssn_model, get_retriever, register_retriever


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    model = build_ssn_model("ViT-Tiny-P8-32", pretrained=None).eval()
    size = model.backbone.image_size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    token_ids = model.backbone.tokenize(["make it red", "add a circle", "remove the square and the dog"])
    return model, images, token_ids


def test_registry_holds_ssn_and_the_three_baselines():
    assert RETRIEVAL_METHODS == tuple(RETRIEVERS) == ("ssn", "image", "text", "sum")
    assert get_retriever("text") is RETRIEVERS["text"]
    assert get_retriever(RETRIEVERS["sum"]) is RETRIEVERS["sum"]
    with pytest.raises(ValueError, match=r"unknown retrieval method 'clip'; choose from \('ssn', 'image', 'text', 'sum'\)"):
        get_retriever("clip")
    with pytest.raises(ValueError, match="already registered"):
        register_retriever(RETRIEVERS["ssn"])
    with pytest.raises(ValueError, match="has no name"):
        register_retriever(Retriever())


@torch.no_grad()
def test_each_method_is_its_formula(batch):
    model, images, token_ids = batch
    image = model.backbone.encode_image(images)
    text = model.backbone.encode_text(token_ids)
    v, t = F.normalize(image.embeds, dim=-1), F.normalize(text.embeds, dim=-1)
    queries = {
        "ssn": model.head.compose(image.tokens, image.embeds, text.tokens, text.embeds, text.mask)[0],  # q⁺
        "image": v,
        "text": t,
        "sum": F.normalize(v + t, dim=-1),
    }
    target = model.head.encode_target(image.tokens, image.embeds)
    for name, expected in queries.items():
        query = model.encode_query(images, token_ids, name)
        torch.testing.assert_close(query, expected, msg=name)
        torch.testing.assert_close(query.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(model.encode_gallery(images, name), target if name == "ssn" else v, msg=name)


@torch.no_grad()
def test_a_registered_retriever_is_used_by_the_model(batch):
    model, images, token_ids = batch

    class Difference(Retriever):
        name = "difference"

        def encode_query(self, model, reference_images, token_ids):
            return F.normalize(model.encode_query(reference_images, token_ids, "sum")
                               - model.encode_query(reference_images, token_ids, "image"), dim=-1)

    register_retriever(Difference())
    try:
        expected = F.normalize(model.encode_query(images, token_ids, "sum") - model.encode_query(images, token_ids, "image"),
                               dim=-1)
        torch.testing.assert_close(model.encode_query(images, token_ids, "difference"), expected)
        torch.testing.assert_close(model.encode_gallery(images, "difference"), model.encode_gallery(images, "image"))
    finally:
        del RETRIEVERS["difference"]
    with pytest.raises(ValueError, match="unknown retrieval method 'difference'"):
        model.encode_query(images, token_ids, "difference")
