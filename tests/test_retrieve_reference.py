"""retrieve.py leaves the reference image out of its own results (as CIRR evaluation does); --keep_reference keeps it."""
from pathlib import Path

import pytest
from PIL import Image

import retrieve
from checkpoint import save_checkpoint
from model import build_ssn_model
from model.official import converted_checkpoint

NUM_IMAGES = 6


@pytest.fixture(scope="module")
def folder_and_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of distinct images and an untrained tiny checkpoint (what ranks first does not matter here)."""
    root = tmp_path_factory.mktemp("retrieve")
    gallery = root / "gallery"
    gallery.mkdir()
    for i in range(NUM_IMAGES):
        Image.new("RGB", (32, 32), (40 * i, 255 - 40 * i, 7 * i)).save(gallery / f"img{i}.png")
    checkpoint = root / "best.pt"
    save_checkpoint(checkpoint, converted_checkpoint(build_ssn_model("ViT-Tiny-P8-32"), "cirr", None, {"transform": "clip"}))
    return gallery, checkpoint


@pytest.mark.parametrize("keep", [False, True])
def test_reference_in_the_folder(folder_and_checkpoint, tmp_path, keep):
    gallery, checkpoint = folder_and_checkpoint
    reference = gallery / "img2.png"
    argv = ["--checkpoint", str(checkpoint), "--reference", str(reference), "--text", "make the circle blue",
            "--gallery_dir", str(gallery), "--top_k", str(NUM_IMAGES), "--device", "cpu",
            "--cache_dir", str(tmp_path / "cache")]
    results = retrieve.main(argv + (["--keep_reference"] if keep else []))
    paths = [path.resolve() for path, _ in results]
    assert (reference.resolve() in paths) is keep
    assert len(paths) == (NUM_IMAGES if keep else NUM_IMAGES - 1)
    assert set(paths) | {reference.resolve()} == {p.resolve() for p in gallery.iterdir()}
