"""The open_clip wrapper: token capture, text truncation, shipped configs, whole-model gradients."""
from __future__ import annotations

import open_clip
import pytest
import torch

from model import build_ssn_model, create_backbone, list_shipped_configs, ssn_loss


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone("ViT-Tiny-P8-32").eval()


def test_shipped_configs_are_registered_with_open_clip():
    assert {"ViT-Tiny-P8-32", "ViT-Tiny-P16-64"} <= set(list_shipped_configs())
    assert set(list_shipped_configs()) <= set(open_clip.list_models())


@pytest.mark.parametrize("name, size, tokens, width", [("ViT-Tiny-P8-32", 32, 1 + 16, 64), ("ViT-Tiny-P16-64", 64, 1 + 16, 96)])
def test_image_tokens_are_the_pre_layernorm_sequence(name, size, tokens, width):
    torch.manual_seed(0)
    model = create_backbone(name).eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = model.encode_image(images)
        visual = model.clip.visual
        # The same sequence computed by hand: embeddings, ln_pre, transformer; no ln_post.
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], 1) + visual.positional_embedding
        expected = visual.transformer(visual.ln_pre(x))
    assert features.tokens.shape == (2, tokens, width)
    torch.testing.assert_close(features.tokens, expected)
    torch.testing.assert_close(features.embeds, model.clip.encode_image(images))


def test_text_is_cut_to_the_longest_caption_without_changing_features(backbone):
    captions = ["make the circle blue and remove the square", "remove it"]
    ids = backbone.tokenize(captions)
    full = open_clip.get_tokenizer("ViT-Tiny-P8-32")(captions)
    assert ids.shape == (2, int((full != 0).sum(1).max()))
    with torch.no_grad():
        short = backbone.encode_text(ids)
        reference = backbone.clip.encode_text(full)
    torch.testing.assert_close(short.embeds, reference, atol=1e-5, rtol=1e-5)
    assert short.mask.tolist()[1] == [1.0] * 4 + [0.0] * (ids.shape[1] - 4)
    assert short.tokens.shape == (2, ids.shape[1], backbone.text_width)


def test_unknown_model_and_bad_pretrained_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip model"):
        create_backbone("ViT-Nope-1")
    with pytest.raises(ValueError, match="neither a local checkpoint file nor a pretrained tag"):
        create_backbone("ViT-Tiny-P8-32", pretrained=str(tmp_path / "missing.pt"))


def test_local_checkpoint_file_loads(tmp_path):
    torch.manual_seed(1)
    source = open_clip.create_model("ViT-Tiny-P8-32")
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = create_backbone("ViT-Tiny-P8-32", pretrained=str(path))
    torch.testing.assert_close(loaded.clip.visual.conv1.weight, source.visual.conv1.weight)


def test_every_trainable_parameter_of_the_whole_model_gets_a_gradient():
    torch.manual_seed(0)
    model = build_ssn_model("ViT-Tiny-P16-64").train()
    ids = model.backbone.tokenize(["make the circle blue", "remove the square", "add a red triangle"])
    q_pos, q_neg, target = model(torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64), ids)
    ssn_loss(q_pos, q_neg, target).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) > 40
    for name, param in trainable:
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def test_configure_optimizers_covers_every_parameter_once():
    model = build_ssn_model("ViT-Tiny-P8-32")
    for kind in ("adam", "adamw"):
        optimizer = model.configure_optimizers(lr=1e-3, lr_ratio=0.2, optimizer=kind)
        ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len(list(model.parameters()))
        backbone = next(g for g in optimizer.param_groups if g["name"] == "backbone")
        assert backbone["lr"] == pytest.approx(2e-4)
    assert backbone["eps"] == 1e-4


def test_freeze_vision_tower_leaves_text_and_head_trainable():
    model = build_ssn_model("ViT-Tiny-P8-32")
    model.freeze_vision_tower()
    assert not any(p.requires_grad for p in model.backbone.clip.visual.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert model.backbone.clip.token_embedding.weight.requires_grad
