"""Files CVSI exchanges with the outside: val predictions that the benchmarks' own evaluation code
scores, and the released Φ checkpoints (CVSI's ViT-B/32 and ViT-bigG, LinCIR's ViT-L/14)."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch

import zero_shot_cvsi
from cvsi import demo
from cvsi.loopback import LoopbackChatServer
from cvsi.phi import Phi, PhiCheckpointError, load_phi, save_phi
from model import create_backbone
from synthetic import CAPTIONS_DIR, make_synthetic_circo, make_synthetic_cirr, make_synthetic_fashioniq
from tests.reference.official_circo import official_circo_scores

CLIP = "ViT-Tiny-P8-32"


def _args(dataset, root, out, *extra):
    return ["--dataset", dataset, "--data_root", str(root), "--clip_model_name", CLIP, "--pretrained", "none",
            "--transform", "clip", "--cache_dir", str(out / "cache"), "--output_dir", str(out / "run"),
            "--batch_size", "32", "--save_predictions", *extra]


# ------------------------------------------------------------------------------------------ val predictions
def test_circo_val_predictions_scored_by_the_official_evaluation_give_the_pipelines_numbers(tmp_path):
    # A gallery larger than 50, so the file holds exactly the 50 predictions the official script reads.
    root = make_synthetic_circo(tmp_path / "data", seed=1, num_val=10, num_test=2, gallery_size=70, image_size=32)
    torch.manual_seed(0)
    backbone = create_backbone(CLIP)
    phi = tmp_path / "phi.pt"
    save_phi(phi, Phi(backbone.embed_dim, backbone.text_width))
    captions = ["--captions_file", str(root / CAPTIONS_DIR / "unlabeled2017.json"), "--num_captions", "3"]
    with LoopbackChatServer(demo.synthetic_editor) as server:
        result = zero_shot_cvsi.main(_args("circo", root, tmp_path, "--phi_checkpoint", str(phi), *captions,
                                           "--llm_base_url", server.base_url, "--llm_model", "m", "--ablations"))
    # The CVSI row only, in the test submission's format.
    assert result["files"] == [tmp_path / "run" / "val_predictions" / "circo_test_submission_cvsi.json"]
    predictions = json.loads(result["files"][0].read_text())
    assert all(len(ids) == 50 and all(isinstance(i, int) for i in ids) for ids in predictions.values())

    map_at, recall_at, semantic = official_circo_scores(root, predictions)
    ours = result["metrics"]["CVSI"]
    assert ours["mAP@10"] > 0  # a ranking with hits, so the comparison can fail
    for k in (5, 10, 25, 50):
        assert ours[f"mAP@{k}"] == pytest.approx(100 * map_at[k], abs=1e-9)
        assert ours[f"R@{k}"] == pytest.approx(100 * recall_at[k], abs=1e-9)
    assert semantic and {f"mAP@10_{a}": pytest.approx(100 * v, abs=1e-9) for a, v in semantic.items()} == \
        {k: v for k, v in ours.items() if k.startswith("mAP@10_")}
    assert result["metrics"]["w/o fine-grained features"] != ours  # the ablations were scored, not written


def _recall(rankings: dict, targets: dict, k: int) -> float:
    return 100 * sum(targets[q] in ranked[:k] for q, ranked in rankings.items()) / len(rankings)


IMAGE_ONLY = ("--alpha", "0", "--beta", "0", "--drop", "semantic")  # q = q_v, t = t_v: no captions or LLM


def test_cirr_val_predictions_are_the_server_files_and_give_the_pipelines_recalls(tmp_path):
    root = make_synthetic_cirr(tmp_path / "data", seed=0, num_train=6, num_val=24, num_test=2, image_size=32)
    result = zero_shot_cvsi.main(_args("cirr", root, tmp_path, *IMAGE_ONLY))
    recall_file, subset_file = result["files"]
    assert (recall_file.name, subset_file.name) == ("recall_submission_cvsi.json", "recall_subset_submission_cvsi.json")
    assert recall_file.parent == tmp_path / "run" / "val_predictions"
    recall, subset = json.loads(recall_file.read_text()), json.loads(subset_file.read_text())
    assert (recall.pop("version"), recall.pop("metric"), subset.pop("version"), subset.pop("metric")) == \
        ("rc2", "recall", "rc2", "recall_subset")
    triplets = {str(t["pairid"]): t for t in json.loads((root / "cirr" / "captions" / "cap.rc2.val.json").read_text())}
    assert set(recall) == set(subset) == set(triplets)
    assert all(len(r) == 50 and triplets[q]["reference"] not in r for q, r in recall.items())
    targets = {q: t["target_hard"] for q, t in triplets.items()}
    ours = result["metrics"]["CVSI"]
    assert 0 < ours["R@10"] < 100
    for k in (1, 5, 10, 50):
        assert ours[f"R@{k}"] == pytest.approx(_recall(recall, targets, k))
    for k in (1, 2, 3):
        assert ours[f"Rs@{k}"] == pytest.approx(_recall(subset, targets, k))


def test_fashioniq_val_predictions_per_category_give_the_pipelines_recalls(tmp_path):
    root = make_synthetic_fashioniq(tmp_path / "data", seed=0, num_train_per_category=4, num_val_per_category=60,
                                    num_test_per_category=2, image_size=32)
    result = zero_shot_cvsi.main(_args("fashioniq", root, tmp_path, *IMAGE_ONLY))
    assert [p.name for p in result["files"]] == [f"fashioniq_{c}_test_rankings_cvsi.json"
                                                 for c in ("dress", "shirt", "toptee")]
    ours = result["metrics"]["CVSI"]
    for path, category in zip(result["files"], ("dress", "shirt", "toptee")):
        rankings = json.loads(path.read_text())
        triplets = json.loads((root / "captions" / f"cap.{category}.val.json").read_text())
        assert list(rankings) == [f"{category}:{i}" for i in range(len(triplets))]
        assert all(len(r) == 50 for r in rankings.values())
        targets = {f"{category}:{i}": t["target"] for i, t in enumerate(triplets)}
        for k in (10, 50):
            assert ours[f"{category}_R@{k}"] == pytest.approx(_recall(rankings, targets, k))


# ------------------------------------------------------------------------------------------ released Φ files
def _dims(model_name: str) -> tuple[int, int]:
    """(D, w) of an open_clip model from its config: joint embedding dim and text width."""
    config = open_clip.get_model_config(model_name)
    return config["embed_dim"], config["text_cfg"]["width"]


def _release_layout_file(path, input_dim, output_dim, step=12345, dtype=torch.float32):
    """A file as LinCIR's / CVSI's training script saves Φ: ``{"epoch": global step, "Phi": state_dict}`` with
    ``layers.{0,3,6}.{weight,bias}`` of an MLP D -> 4D -> 4D -> w, the weights of nn.Linear layout [out, in]."""
    hidden = 4 * input_dim
    generator = torch.Generator().manual_seed(input_dim)
    shapes = {"layers.0.weight": (hidden, input_dim), "layers.0.bias": (hidden,),
              "layers.3.weight": (hidden, hidden), "layers.3.bias": (hidden,),
              "layers.6.weight": (output_dim, hidden), "layers.6.bias": (output_dim,)}
    state = {key: (torch.randn(shape, generator=generator) * 0.02).to(dtype) for key, shape in shapes.items()}
    torch.save({"epoch": step, "Phi": state}, path)
    return state


# file, the backbone it was trained for (open_clip name), the (D, w) its Hugging Face text encoder reports
# (projection_dim, hidden_size), which the release uses to build Φ.
RELEASED = [
    ("phi_best_base_openai.pt", "ViT-B-32", (512, 512)),        # CVSI, openai/clip-vit-base-patch32
    ("lincir_large.pt", "ViT-L-14", (768, 768)),                # LinCIR, openai/clip-vit-large-patch14
    ("phi_best_giga_openclip.pt", "ViT-bigG-14", (1280, 1280)),  # CVSI / LinCIR giga, laion2b_s39b_b160k
]


@pytest.mark.parametrize("name, model_name, hf_dims", RELEASED, ids=[r[0] for r in RELEASED])
def test_released_phi_layouts_load_for_their_backbone_and_are_refused_by_others(tmp_path, name, model_name, hf_dims):
    assert _dims(model_name) == hf_dims  # the open_clip model has the dimensions the file was built for
    path = tmp_path / name
    state = _release_layout_file(path, *hf_dims)
    phi = load_phi(path, *_dims(model_name))
    for key, value in phi.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    x = torch.randn(2, hf_dims[0])
    reference = torch.nn.functional.linear
    hidden = torch.nn.functional.gelu(reference(x, state["layers.0.weight"], state["layers.0.bias"]))
    hidden = torch.nn.functional.gelu(reference(hidden, state["layers.3.weight"], state["layers.3.bias"]))
    torch.testing.assert_close(phi(x), reference(hidden, state["layers.6.weight"], state["layers.6.bias"]))
    assert not phi.training  # dropout off

    other = next(m for m in ("ViT-B-32", "ViT-L-14", "ViT-bigG-14") if _dims(m) != hf_dims)
    with pytest.raises(PhiCheckpointError, match=rf"trained for a CLIP with embedding dim D={hf_dims[0]} and text "
                                                 rf"width w={hf_dims[1]}"):
        load_phi(path, *_dims(other))


def test_half_precision_and_bare_phi_files_load(tmp_path):
    state = _release_layout_file(tmp_path / "half.pt", 64, 48, dtype=torch.float16)
    phi = load_phi(tmp_path / "half.pt", 64, 48)
    assert all(p.dtype == torch.float32 for p in phi.parameters())
    torch.testing.assert_close(phi.layers[6].weight, state["layers.6.weight"].float(), rtol=0, atol=0)
    torch.save(state, tmp_path / "bare.pt")  # a bare state dict, as some re-uploads store it
    torch.testing.assert_close(load_phi(tmp_path / "bare.pt", 64, 48).layers[0].bias, state["layers.0.bias"].float())
