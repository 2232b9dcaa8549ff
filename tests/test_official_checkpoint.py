"""End to end: a model of the official SSN code, saved the official way, converted, rebuilt, same outputs.

The official model is the re-statement in ``benchmarks/official_ssn.py`` around a tiny random Hugging
Face CLIP (64-wide heads, QuickGELU, vision width 192 != text width 128 = embed size).
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

import convert_official_checkpoint
import inference
import retrieve
import train_cirr
from benchmarks.official_ssn import OfficialSSN
from checkpoint import load_checkpoint
from model import build_ssn_model, hf_clip, ssn_loss, ssn_model_from_checkpoint
from model.official import OfficialCheckpointError, official_state_dict, ssn_model_from_official
from synthetic import make_synthetic_cirr
from training.model_setup import initial_model

ROOT = Path(__file__).resolve().parents[1]
WIDTH, VISION_WIDTH, IMAGE, PATCH = 128, 192, 32, 8
BOS, EOT = 49406, 49407


def tiny_clip_config(hidden_act: str = "quick_gelu", text_layers: int = 2) -> CLIPConfig:
    text = dict(hidden_size=WIDTH, num_attention_heads=WIDTH // 64, num_hidden_layers=text_layers,
                intermediate_size=4 * WIDTH, projection_dim=WIDTH, hidden_act=hidden_act)
    vision = dict(hidden_size=VISION_WIDTH, num_attention_heads=VISION_WIDTH // 64, num_hidden_layers=2,
                  intermediate_size=4 * VISION_WIDTH, patch_size=PATCH, image_size=IMAGE, projection_dim=WIDTH,
                  hidden_act=hidden_act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=WIDTH)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(official model in eval mode, its checkpoint file, its config.json)."""
    root = tmp_path_factory.mktemp("official")
    config = tiny_clip_config()
    config.save_pretrained(root / "clip")
    torch.manual_seed(0)
    model = OfficialSSN(CLIPTextModelWithProjection(config.text_config),
                        CLIPVisionModelWithProjection(config.vision_config), projection_dim=WIDTH, hidden_dim=WIDTH)
    with torch.no_grad():  # trained-looking weights: Hugging Face's init (std 0.02) leaves the blocks near identity
        for name, param in model.named_parameters():
            if param.ndim >= 2 and "embedding" not in name:
                param.normal_(0, 1.5 / param.shape[-1] ** 0.5)
    model.eval().save_official(root / "combiner_arithmetic.pt", epoch=4)
    return model, root / "combiner_arithmetic.pt", root / "clip" / "config.json"


def _inputs(batch: int = 4, length: int = 9, seed: int = 1):
    """Pixels and unpadded captions (every caption `length` tokens, start and end-of-text included)."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(1, BOS, (batch, length - 2), generator=g)
    ids = torch.cat([torch.full((batch, 1), BOS), words, torch.full((batch, 1), EOT)], 1)
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=g), ids, torch.randn(batch, 3, IMAGE, IMAGE, generator=g)


def _convert(official_path: Path, config: Path | None, output: Path, *extra: str) -> int:
    argv = [str(official_path), "--output", str(output), "--dataset", "cirr", *extra]
    return convert_official_checkpoint.main(argv + (["--clip_config", str(config)] if config else []))


def test_converted_official_model_gives_the_official_features_and_loss(official, tmp_path, monkeypatch):
    model, path, official_config = official
    config = tmp_path / "config.json"
    config.write_bytes(official_config.read_bytes())
    output = tmp_path / "run" / "checkpoints" / "best.pt"
    assert _convert(path, config, output, "--data_root", str(tmp_path)) == 0
    checkpoint = load_checkpoint(output)
    name = checkpoint["model_config"]["clip_model_name"]
    assert name.startswith(hf_clip.NAME_PREFIX) and checkpoint["model_config"]["quick_gelu"] is True
    assert checkpoint["dataset"] == "cirr" and checkpoint["epoch"] == 5 and checkpoint["args"]["official_epoch"] == 4
    # Rebuilt from the checkpoint alone: neither the Hugging Face config nor the registered name is needed.
    monkeypatch.delitem(open_clip.factory._MODEL_CONFIGS, name)
    config.unlink()
    ours = ssn_model_from_checkpoint(checkpoint, source=str(output)).eval()

    reference, ids, target = _inputs()
    with torch.no_grad():
        expected = model.features(reference, ids, torch.ones_like(ids), target)
        expected_loss = model(reference, ids, torch.ones_like(ids), target)
        got = ours(reference, target, ids)
        query, gallery = ours.encode_query(reference, ids), ours.encode_gallery(target)
    for label, a, b in zip(("q+", "q-", "t"), got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=lambda m: f"{label}: {m}")
    torch.testing.assert_close(ssn_loss(*got), expected_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(query, expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(gallery, expected[2], rtol=0, atol=1e-5)
    assert (expected[0] - expected[1]).abs().max() > 1e-2  # the two branches differ: the comparison has teeth

    # The same weights in a GELU network (what a plain open_clip ViT config builds) are a different model.
    gelu = ssn_model_from_checkpoint({**checkpoint, "model_config": {**checkpoint["model_config"], "quick_gelu": False}})
    with torch.no_grad():
        assert (gelu.eval()(reference, target, ids)[0] - expected[0]).abs().max() > 1e-3


def test_converted_checkpoint_serves_inference_scripts(official, tmp_path):
    """load_trained_model (validate.py, cirr_test_submission.py, retrieve.py) and retrieve.py itself: the
    scores of a query against a folder are the official model's cosine similarities."""
    model, path, config = official
    output = tmp_path / "converted.pt"
    assert _convert(path, config, output) == 0
    trained = inference.load_trained_model(output, torch.device("cpu"))
    assert trained.dataset == "cirr" and trained.train_args["transform"] == "clip"
    assert trained.model.backbone.image_size == IMAGE

    gallery_dir = tmp_path / "gallery"
    gallery_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (41 + i, 37, 3), dtype=np.uint8)).save(gallery_dir / f"{i}.png")
    text = "make it blue"
    results = retrieve.main(["--checkpoint", str(output), "--reference", str(gallery_dir / "0.png"), "--text", text,
                             "--gallery_dir", str(gallery_dir), "--top_k", "4", "--device", "cpu",
                             "--cache_dir", str(tmp_path / "cache")])
    pixels = {p.name: trained.transform(Image.open(p)) for p in sorted(gallery_dir.glob("*.png"))}
    ids = trained.model.backbone.tokenize([text])
    with torch.no_grad():
        query, _, _ = model.features(pixels["0.png"][None], ids, torch.ones_like(ids), pixels["0.png"][None])
        targets = {n: model.features(pixels["0.png"][None], ids, torch.ones_like(ids), x[None])[2] for n, x in pixels.items()}
    assert [p.name for p, _ in results] == sorted((n for n in targets if n != "0.png"),
                                                  key=lambda n: -float(query @ targets[n].T))
    for found, score in results:
        assert score == pytest.approx(float(query @ targets[found.name].T), abs=1e-5)


@pytest.mark.slow  # a training run
def test_converted_checkpoint_fine_tunes_without_resume(official, tmp_path):
    """--pretrained CONVERTED.pt starts a fresh run from its backbone and head (lr 0: they stay as converted)."""
    _, path, config = official
    converted = tmp_path / "converted.pt"
    assert _convert(path, config, converted) == 0
    data = make_synthetic_cirr(tmp_path / "data", seed=3, num_train=8, num_val=4, num_test=2, image_size=IMAGE)
    run = train_cirr.main(["--data_root", str(data), "--clip_model_name", "ViT-Tiny-P8-32", "--pretrained", str(converted),
                           "--num_workers", "0", "--batch_size", "4", "--num_epochs", "1", "--lr", "0",
                           "--output_dir", str(tmp_path / "run")])
    start, last = load_checkpoint(converted), load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["model_config"] == start["model_config"] and last["epoch"] == 1
    assert all(torch.equal(last["model"][key], value) for key, value in start["model"].items())
    assert (run / "summary.json").is_file()


def test_initial_model_tells_project_checkpoints_from_open_clip_weights(official, tmp_path):
    _, path, config = official
    converted = tmp_path / "converted.pt"
    assert _convert(path, config, converted) == 0
    weights = tmp_path / "open_clip.pt"
    torch.save(open_clip.create_model("ViT-Tiny-P8-32").state_dict(), weights)
    args = argparse.Namespace(clip_model_name="ViT-Tiny-P8-32", nhead=8)
    from_weights = initial_model(args, str(weights), torch.device("cpu"))
    assert from_weights.backbone.model_name == "ViT-Tiny-P8-32"
    assert torch.equal(from_weights.backbone.clip.token_embedding.weight, torch.load(weights)["token_embedding.weight"])
    from_checkpoint = initial_model(args, str(converted), torch.device("cpu"))
    assert from_checkpoint.config() == load_checkpoint(converted)["model_config"]
    with pytest.raises(ValueError, match="--nhead 4 differs from the 8 heads of --pretrained"):
        initial_model(argparse.Namespace(clip_model_name="ViT-Tiny-P8-32", nhead=4), str(converted), "cpu")


def test_hugging_face_directory_as_pretrained_backbone(official, tmp_path):
    """--pretrained DIR: the official towers saved as a Hugging Face CLIPModel directory fine-tune from the
    same features the official towers give."""
    model, _, _ = official
    config = tiny_clip_config()
    clip = CLIPModel(config)
    clip.text_model.load_state_dict(model.clip_text_model.text_model.state_dict())
    clip.vision_model.load_state_dict(model.clip_vision_model.vision_model.state_dict())
    clip.text_projection.load_state_dict(model.clip_text_model.text_projection.state_dict())
    clip.visual_projection.load_state_dict(model.clip_vision_model.visual_projection.state_dict())
    clip.save_pretrained(tmp_path / "hf")
    ssn = build_ssn_model("ViT-B-32", pretrained=str(tmp_path / "hf")).eval()  # the name is not used
    reference, ids, _ = _inputs()
    with torch.no_grad():
        image = ssn.backbone.encode_image(reference)
        text = ssn.backbone.encode_text(ids)
        vision = model.clip_vision_model(pixel_values=reference)
        words = model.clip_text_model(input_ids=ids)
    torch.testing.assert_close(image.tokens, vision.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(image.embeds, vision.image_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(text.tokens, words.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(text.embeds, words.text_embeds, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
def test_openai_sizes_need_no_config(official):
    """ViT-B/32-shaped official weights (shapes only, on the meta device) give OpenAI's config; the tiny
    model's shapes are no OpenAI size, so without --clip_config the conversion names what is missing."""
    with torch.device("meta"):
        towers = CLIPModel(CLIPConfig(text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                                                       num_hidden_layers=12, projection_dim=512),
                                      vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                         num_hidden_layers=12, patch_size=32, image_size=224,
                                                         projection_dim=512), projection_dim=512))
    state = {("clip_text_model." if k.startswith("text") else "clip_vision_model.") + k: v
             for k, v in towers.state_dict().items() if k != "logit_scale"}
    config = hf_clip.openai_hf_config(state, "b32.pt")
    assert config["_name_or_path"] == "openai/clip-vit-base-patch32"
    model_cfg = hf_clip.open_clip_model_config(config)
    openai = open_clip.get_model_config("ViT-B-32-quickgelu")  # open_clip's config for OpenAI's B/32
    for section in ("vision_cfg", "text_cfg"):
        assert {k: model_cfg[section][k] for k in openai[section]} == openai[section]
        assert model_cfg[section]["mlp_ratio"] == 4.0 and model_cfg[section]["norm_kwargs"] == {"eps": 1e-5}
    assert model_cfg["vision_cfg"]["head_width"] == 64
    assert (model_cfg["embed_dim"], model_cfg["quick_gelu"]) == (openai["embed_dim"], True)
    hf_clip.check_fits(hf_clip.hf_to_open_clip_state_dict(state, "b32.pt"), model_cfg, "b32.pt")

    _, path, _ = official
    state, _ = official_state_dict(torch.load(path, weights_only=True), str(path))
    with pytest.raises(OfficialCheckpointError, match="not one of OpenAI's CLIP sizes.*pass the model's config.json"):
        ssn_model_from_official(state, None, str(path))


def test_bad_inputs_get_one_line_errors(official, tmp_path, capsys):
    _, path, config = official
    output = tmp_path / "out.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.pt")
    assert _convert(tmp_path / "other.pt", config, output) == 1
    assert "other.pt: not an official SSN checkpoint" in capsys.readouterr().err
    assert _convert(tmp_path / "missing.pt", config, output) == 1
    assert "missing.pt: no such file" in capsys.readouterr().err

    three_layers = tmp_path / "three_layers"
    tiny_clip_config(text_layers=3).save_pretrained(three_layers)
    assert _convert(path, three_layers / "config.json", output) == 1
    err = capsys.readouterr().err
    assert f"{path} with {three_layers / 'config.json'}: the weights do not fit the config" in err
    assert "missing, e.g. ['transformer.resblocks.2." in err and err.count("\n") == 1
    assert not output.exists()

    assert _convert(path, config, output) == 0 and _convert(path, config, output) == 1
    assert "exists (--overwrite replaces it)" in capsys.readouterr().err
    assert _convert(output, config, tmp_path / "again.pt") == 1  # a converted checkpoint is no official one
    assert "already a checkpoint of this project" in capsys.readouterr().err


def test_script_exits_non_zero_without_traceback(tmp_path, monkeypatch, capsys):
    """As ``python convert_official_checkpoint.py ...`` ends: its ``__main__`` guard, run in this process."""
    torch.save([1, 2, 3], tmp_path / "list.pt")
    script = ROOT / "convert_official_checkpoint.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "list.pt"), "--output", str(tmp_path / "out.pt"),
                                      "--dataset", "fashioniq"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert err.startswith("error: ") and "list.pt: not an official SSN" in err
