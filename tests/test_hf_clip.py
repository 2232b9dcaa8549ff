"""Hugging Face CLIP directories as backbones (model/hf_clip.py): same features as transformers, named errors."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from model import build_ssn_model, create_backbone, hf_clip, ssn_model_from_checkpoint


def _config(hidden_act: str = "quick_gelu", **top) -> CLIPConfig:
    text = dict(hidden_size=64, num_attention_heads=1, num_hidden_layers=2, intermediate_size=128, projection_dim=64,
                hidden_act=hidden_act, layer_norm_eps=1e-6)
    vision = dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=1, intermediate_size=512, patch_size=8,
                  image_size=16, projection_dim=64, hidden_act=hidden_act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64, **top)


def _hf_dir(path, hidden_act: str = "quick_gelu", weights: str = "safetensors") -> CLIPModel:
    torch.manual_seed(0)
    model = CLIPModel(_config(hidden_act)).eval()
    with torch.no_grad():  # away from Hugging Face's near-identity init, so the activation matters
        for name, param in model.named_parameters():
            if param.ndim >= 2 and "embedding" not in name:
                param.normal_(0, 1.5 / param.shape[-1] ** 0.5)
    model.save_pretrained(path, **({"max_shard_size": "2MB"} if weights == "sharded" else {}))
    if weights == "bin":
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return model


@pytest.mark.parametrize("hidden_act, weights", [("quick_gelu", "safetensors"), ("gelu", "bin"), ("quick_gelu", "sharded")])
def test_hugging_face_directory_gives_transformers_features(tmp_path, hidden_act, weights):
    hf = _hf_dir(tmp_path, hidden_act, weights)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (weights == "sharded")
    backbone = create_backbone("any-label", pretrained=str(tmp_path)).eval()
    assert backbone.model_name.startswith(hf_clip.NAME_PREFIX)
    assert backbone.quick_gelu is (hidden_act == "quick_gelu")
    assert (backbone.image_token_dim, backbone.text_width, backbone.embed_dim, backbone.image_size) == (128, 64, 64, 16)
    pixels = torch.randn(3, 3, 16, 16)
    ids = backbone.tokenize(["a red circle", "remove the blue square and add a cat", "x"])
    with torch.no_grad():
        image, text = backbone.encode_image(pixels), backbone.encode_text(ids)
        vision, words = hf.vision_model(pixel_values=pixels), hf.text_model(input_ids=ids)
        torch.testing.assert_close(image.tokens, vision.last_hidden_state, rtol=0, atol=1e-5)
        torch.testing.assert_close(image.embeds, hf.visual_projection(vision.pooler_output), rtol=0, atol=1e-5)
        torch.testing.assert_close(text.embeds, hf.text_projection(words.pooler_output), rtol=0, atol=1e-5)
        real = text.mask.bool()  # padded positions are never read
        torch.testing.assert_close(text.tokens[real], words.last_hidden_state[real], rtol=0, atol=1e-5)
    # The other activation on the same weights is another network (the check above can fail).
    other = create_backbone(backbone.model_name, quick_gelu=hidden_act != "quick_gelu").eval()
    other.clip.load_state_dict(backbone.clip.state_dict())
    with torch.no_grad():
        assert (other.encode_image(pixels).embeds - image.embeds).abs().max() > 1e-3


def test_checkpoint_of_a_hugging_face_backbone_rebuilds_without_the_directory(tmp_path, monkeypatch):
    _hf_dir(tmp_path / "hf")
    model = build_ssn_model("ViT-B-32", pretrained=str(tmp_path / "hf")).eval()
    config = model.config()
    assert config["open_clip_config"] == open_clip.get_model_config(config["clip_model_name"])
    assert config["open_clip_config"]["text_cfg"]["norm_kwargs"] == {"eps": 1e-6}
    checkpoint = {"model_config": config, "model": model.state_dict()}
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    monkeypatch.delitem(open_clip.factory._MODEL_CONFIGS, config["clip_model_name"])  # as in a new process
    rebuilt = ssn_model_from_checkpoint(torch.load(tmp_path / "ckpt.pt", weights_only=True)).eval()
    assert rebuilt.config() == config
    pixels, ids = torch.randn(2, 3, 16, 16), model.backbone.tokenize(["make it blue", "add a dog"])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_query(pixels, ids), model.encode_query(pixels, ids), rtol=0, atol=0)

    tampered = {**config, "open_clip_config": {**config["open_clip_config"], "embed_dim": 32}}
    with pytest.raises(ValueError, match="does not match its stored open_clip config"):
        ssn_model_from_checkpoint({"model_config": tampered, "model": checkpoint["model"]}, source="ckpt.pt")


def test_config_names_are_content_hashes():
    model_cfg = hf_clip.open_clip_model_config(_config().to_dict())
    assert hf_clip.model_config_name(model_cfg) == hf_clip.model_config_name(json.loads(json.dumps(model_cfg)))
    changed = {**model_cfg, "quick_gelu": False}
    assert hf_clip.model_config_name(changed) != hf_clip.model_config_name(model_cfg)
    assert hf_clip.registered_config("ViT-B-32") is None


def _write_config(directory, config: dict) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, message", [
    (lambda c: c["text_config"].update(hidden_act="relu"), "text_config.hidden_act 'relu' is not supported"),
    (lambda c: c["vision_config"].update(hidden_act="gelu"), "different hidden_act"),
    (lambda c: c["text_config"].update(vocab_size=1000), "text_config.vocab_size 1000 is not CLIP's BPE vocabulary"),
    (lambda c: c["text_config"].update(projection_dim=512), "text_config.projection_dim 512 differs from projection_dim 64"),
    (lambda c: c["vision_config"].update(num_attention_heads=3), "hidden_size 128 is not divisible by num_attention_heads 3"),
    (lambda c: c["vision_config"].pop("hidden_size"), "vision_config.hidden_size is missing"),
    (lambda c: c.pop("vision_config"), "not a Hugging Face CLIPConfig"),
])
def test_configs_open_clip_cannot_build_are_named(tmp_path, change, message):
    config = _config().to_dict()
    change(config)
    _write_config(tmp_path, config)
    with pytest.raises(hf_clip.HFCLIPError, match=message) as error:
        create_backbone("ViT-B-32", pretrained=str(tmp_path))
    assert str(tmp_path / "config.json") in str(error.value) and "\n" not in str(error.value)


def test_directories_without_config_or_weights_are_named(tmp_path):
    with pytest.raises(hf_clip.HFCLIPError, match=r"config.json: no such file"):
        create_backbone("ViT-B-32", pretrained=str(tmp_path))
    _write_config(tmp_path, _config().to_dict())
    with pytest.raises(hf_clip.HFCLIPError, match=rf"{tmp_path}: no weights \(model.safetensors or pytorch_model.bin"):
        create_backbone("ViT-B-32", pretrained=str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(hf_clip.HFCLIPError, match="model.safetensors: corrupt or not a weights file"):
        create_backbone("ViT-B-32", pretrained=str(tmp_path))


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    _hf_dir(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["patch_size"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_clip.HFCLIPError, match=r"\(config.json and weights\): the weights do not fit the config: "
                                                  r"visual.conv1.weight \(128, 3, 8, 8\) \(config: \(128, 3, 4, 4\)\); "
                                                  r"visual.positional_embedding \(5, 128\) \(config: \(17, 128\)\)"):
        create_backbone("ViT-B-32", pretrained=str(tmp_path))


def test_unknown_and_incomplete_weights_are_named():
    state = {"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}
    with pytest.raises(hf_clip.HFCLIPError, match=r"w.pt: text_model.encoder.layers.0 lacks self_attn.k_proj.weight"):
        hf_clip.hf_to_open_clip_state_dict(state, "w.pt")
    with pytest.raises(hf_clip.HFCLIPError, match=r"w.pt: 1 weight\(s\) that are not Hugging Face CLIP's, e.g. \['head.x'\]"):
        hf_clip.hf_to_open_clip_state_dict({"head.x": torch.zeros(1)}, "w.pt")
