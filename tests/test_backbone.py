"""The open_clip wrapper: token capture, text truncation and mask, activation, shipped configs, gradients."""
from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from cvsi.pseudo_tokens import placeholder_token_id
from model import (
    CheckpointMismatchError,
    build_ssn_model,
    check_model_config,
    create_backbone,
    list_shipped_configs,
    resolve_quick_gelu,
    ssn_loss,
    ssn_model_from_checkpoint,
    text_mask_from_ids,
)
from viz.examples import caption_words

EOT = 49407  # CLIP BPE's end-of-text id


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
    assert ids.shape == (2, int((full == EOT).int().argmax(1).max()) + 1)
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


# ------------------------------------------------------------------ activation follows the weights
def _quick_gelu_modules(model: torch.nn.Module) -> int:
    return sum(isinstance(module, QuickGELU) for module in model.modules())


@pytest.mark.parametrize("name, pretrained, forced, expected", [
    ("ViT-B-32", "openai", None, True),  # OpenAI's weights: QuickGELU although the config says GELU
    ("ViT-B-16", "openai", None, True),
    ("ViT-B-32", "laion2b_s34b_b79k", None, False),
    ("ViT-B-32-quickgelu", None, None, True),  # random weights / local file: the name's own activation
    ("ViT-B-32", None, None, False),
    ("ViT-B-32", "openai", False, False),  # an explicit choice wins
    ("ViT-Tiny-P8-32", None, True, True),
])
def test_quick_gelu_follows_the_pretrained_tag(name, pretrained, forced, expected):
    assert resolve_quick_gelu(name, pretrained, forced) is expected


@pytest.mark.slow  # builds ViT-B-32 three times
def test_openai_weights_run_as_open_clip_quickgelu_model(tmp_path, monkeypatch):
    """create_backbone('ViT-B-32', 'openai') with the download replaced by a local file equals open_clip's
    'ViT-B-32-quickgelu' holding the same weights, and differs from the GELU network of those weights."""
    torch.manual_seed(0)
    path = tmp_path / "openai-vit-b-32.pt"
    torch.save(open_clip.create_model("ViT-B-32-quickgelu").state_dict(), path)
    downloads = []
    monkeypatch.setattr(open_clip.factory, "download_pretrained",
                        lambda cfg, **kwargs: downloads.append(cfg["url"]) or str(path))
    backbone = create_backbone("ViT-B-32", pretrained="openai").eval()
    assert downloads and "openai" in downloads[0]
    assert backbone.describe()["quick_gelu"] is True and _quick_gelu_modules(backbone.clip) == 24
    reference = open_clip.create_model("ViT-B-32-quickgelu", pretrained=str(path)).eval()
    gelu = create_backbone("ViT-B-32", pretrained=str(path)).eval()  # a local file under a GELU name
    assert gelu.describe()["quick_gelu"] is False and _quick_gelu_modules(gelu.clip) == 0

    images = torch.randn(2, 3, 224, 224)
    ids = backbone.tokenize(["make the dog a cat", "add a red hat"])
    full_ids = open_clip.get_tokenizer("ViT-B-32")(["make the dog a cat", "add a red hat"])
    with torch.no_grad():
        image, text = backbone.encode_image(images).embeds, backbone.encode_text(ids).embeds
        torch.testing.assert_close(image, reference.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(text, reference.encode_text(full_ids), rtol=1e-5, atol=1e-5)
        assert (image - gelu.encode_image(images).embeds).abs().max() > 1e-3
        assert (text - gelu.encode_text(ids).embeds).abs().max() > 1e-3


def test_quick_gelu_survives_a_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_ssn_model("ViT-Tiny-P8-32", quick_gelu=True).eval()
    assert model.config()["quick_gelu"] is True
    path = tmp_path / "ckpt.pt"
    torch.save({"model_config": model.config(), "model": model.state_dict()}, path)
    rebuilt = ssn_model_from_checkpoint(torch.load(path, weights_only=True), source=str(path)).eval()
    assert rebuilt.config() == model.config() and _quick_gelu_modules(rebuilt) == 4  # 2 + 2 blocks
    images, ids = torch.randn(2, 3, 32, 32), model.backbone.tokenize(["a red circle", "remove the square"])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_query(images, ids), model.encode_query(images, ids))


def test_checkpoints_without_the_activation_key_rebuild_as_trained():
    """Older configs have no 'quick_gelu': they were built with the config's own activation (GELU here)."""
    model = build_ssn_model("ViT-Tiny-P8-32")
    old_config = {key: value for key, value in model.config().items() if key != "quick_gelu"}
    rebuilt = ssn_model_from_checkpoint({"model_config": old_config, "model": model.state_dict()})
    assert rebuilt.config()["quick_gelu"] is False and _quick_gelu_modules(rebuilt) == 0
    # Resuming GELU-trained weights into a QuickGELU model names the difference.
    with pytest.raises(CheckpointMismatchError, match="quick_gelu: checkpoint has False, model has True"):
        check_model_config(old_config, build_ssn_model("ViT-Tiny-P8-32", quick_gelu=True).config(), "old.pt")


# ------------------------------------------------------------------ captions with "!" (BPE id 0)
# '!".' tokenises to "!" (id 0) + '".': the first and last captions hold an id 0 before their end of text.
EXCLAIMING = ['change the sign to say "stop!".', "make it red!?", "add a dog", 'write "yes!". in red']


def test_text_mask_runs_to_the_end_of_text_token():
    ids = torch.tensor([[49406, 320, 0, 257, EOT, 0, 0], [49406, 320, EOT, 0, 0, 0, 0], [49406, 1, 2, 3, 4, 5, 6]])
    expected = [[True] * 5 + [False] * 2, [True] * 3 + [False] * 4, [True] * 7]  # last row: no EOT, all real
    assert text_mask_from_ids(ids, EOT).tolist() == expected
    assert text_mask_from_ids(ids[:2]).tolist() == expected[:2]  # without an id: the argmax position


def test_captions_with_exclamation_marks_keep_their_end_of_text(backbone):
    full = open_clip.get_tokenizer("ViT-Tiny-P8-32")(EXCLAIMING)  # [4, 77]
    eot_positions = (full == EOT).int().argmax(1)
    assert 0 in full[0, : eot_positions[0]] and 0 in full[3, : eot_positions[3]]
    assert eot_positions.argmax() == 0  # the "!" caption is the longest: the old cut dropped its EOT
    ids = backbone.tokenize(EXCLAIMING)
    assert ids.shape[1] == int(eot_positions.max()) + 1
    with torch.no_grad():
        ours = backbone.encode_text(ids)
        reference = backbone.clip.encode_text(full)
    torch.testing.assert_close(ours.embeds, reference, rtol=1e-5, atol=1e-5)
    for row, end in enumerate(eot_positions.tolist()):
        assert ours.mask[row].tolist() == [1.0] * (end + 1) + [0.0] * (ids.shape[1] - end - 1)


def test_users_of_token_ids_keep_exclamation_marks(backbone):
    tokenizer = backbone.tokenizer
    ids = tokenizer(['say "stop!".'])[0]  # start, say, ", stop, ! (id 0), ". , end
    weights = [0.1 * i for i in range(len(ids))]
    words = caption_words(tokenizer, ids.tolist(), weights)
    assert words == [("say", pytest.approx(0.1)), ('"', pytest.approx(0.2)), ("stop", pytest.approx(0.3)),
                     ('!".', pytest.approx(0.45))]  # "!" and '".' are the pieces of one word
    assert placeholder_token_id(backbone) == 259  # "$": start and end of text found without id 0
