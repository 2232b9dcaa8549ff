"""The synthetic generators: determinism, and the ``python -m synthetic`` command line passing every size through."""
from __future__ import annotations

import functools
import hashlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_utils import CIRCODataset, CIRRDataset, read_json
from synthetic import make_synthetic_circo, make_synthetic_cirr, make_synthetic_fashioniq
from synthetic.circo import BACKGROUNDS, make_complementary_circo
from synthetic.scenes import COLOURS
from synthetic.cli import DESCRIPTION, MAKERS, main

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "cirr": dict(num_train=12, num_val=8, num_test=4, image_size=24),
    "fashioniq": dict(num_train_per_category=4, num_val_per_category=3, num_test_per_category=2, image_size=24),
    "circo": dict(num_val=4, num_test=2, gallery_size=30, image_size=24),
}


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _size_arguments(dataset: str) -> dict[str, int]:
    parameters = inspect.signature(MAKERS[dataset]).parameters.values()
    return {p.name: p.default for p in parameters if p.name not in ("root", "seed")}


@pytest.mark.parametrize("maker,kwargs", [(make_synthetic_cirr, SMALL["cirr"]),
                                          (make_synthetic_fashioniq, SMALL["fashioniq"]),
                                          (make_synthetic_circo, SMALL["circo"])])
def test_generator_is_deterministic(tmp_path, maker, kwargs):
    first = _tree_digest(maker(tmp_path / "a", seed=3, **kwargs))
    again = _tree_digest(maker(tmp_path / "b", seed=3, **kwargs))
    other = _tree_digest(maker(tmp_path / "c", seed=4, **kwargs))
    assert first == again
    assert first != other


@pytest.mark.parametrize("dataset", list(SMALL))
def test_cli_passes_every_size_through(tmp_path, capsys, dataset):
    sizes = SMALL[dataset]
    assert set(sizes) == set(_size_arguments(dataset))  # the test covers every size argument
    flags = [part for name, value in sizes.items() for part in (f"--{name}", str(value))]
    assert main([dataset, "--output", str(tmp_path / "cli"), "--seed", "3", *flags]) == 0
    written = MAKERS[dataset](tmp_path / "direct", seed=3, **sizes)
    assert _tree_digest(tmp_path / "cli" / written.name) == _tree_digest(written)
    assert f"{dataset}: {tmp_path / 'cli' / written.name}" in capsys.readouterr().out


def test_cli_all_calls_every_maker_at_its_defaults(tmp_path, capsys, monkeypatch):
    """``all``'s wiring, without writing ~9,000 images (the slow test below does)."""
    calls = []

    def recording(dataset):
        @functools.wraps(MAKERS[dataset])  # keeps the signature the parser reads the size options from
        def make(root, seed, **sizes):
            calls.append((dataset, root, seed, sizes))
            return Path(root) / dataset
        return make

    for dataset in list(MAKERS):
        monkeypatch.setitem(MAKERS, dataset, recording(dataset))
    assert main(["all", "--output", str(tmp_path), "--seed", "1"]) == 0
    assert calls == [(dataset, tmp_path, 1, {}) for dataset in MAKERS]  # no size given: each maker's defaults
    assert capsys.readouterr().out.splitlines() == [f"{d}: {tmp_path / d}" for d in MAKERS]


@pytest.mark.slow  # ~9,000 images
def test_cli_all_writes_every_dataset_at_default_sizes(tmp_path, capsys):
    assert main(["all", "--output", str(tmp_path), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    for name in ("cirr_dataset", "fashion-iq", "CIRCO"):
        assert (tmp_path / name).is_dir() and str(tmp_path / name) in printed
    # The defaults give the documented sizes.
    assert len(read_json(tmp_path / "cirr_dataset/cirr/captions/cap.rc2.train.json")) == 2400
    assert len(read_json(tmp_path / "cirr_dataset/cirr/captions/cap.rc2.val.json")) == 300
    assert len(CIRRDataset(tmp_path / "cirr_dataset", "train", "relative", lambda x: x)) == 2400


def _help(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width


def test_help_shows_every_size_option_with_its_default(capsys):
    overview = _help([], capsys)
    assert DESCRIPTION in overview
    for dataset in MAKERS:
        sizes = _size_arguments(dataset)
        assert " ".join(f"--{name} {default}" for name, default in sizes.items()) in overview
        help_text = _help([dataset], capsys)
        for name, default in sizes.items():
            assert re.search(rf"--{name} {name.upper()} (?:(?!--).)*\(default: {default}\)", help_text)
        assert help_text.count("(default: ") == len(sizes) + 1  # the sizes and --seed


@pytest.mark.parametrize("argv,message", [
    (["cirr", "--output", "x", "--num_val", "-1"], "--num_val: must be >= 0, got -1"),
    (["circo", "--output", "x", "--image_size", "0"], "--image_size: must be >= 1, got 0"),
    (["fashioniq", "--output", "x", "--num_val_per_category", "many"], "not an integer: 'many'"),
    (["cirr"], "--output"),
])
def test_cli_rejects_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_python_dash_m_synthetic_runs():
    result = subprocess.run([sys.executable, "-m", "synthetic", "circo", "--help"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    assert "--gallery_size" in result.stdout and "(default: 1500)" in result.stdout


# ------------------------------------------------------------------------------------------ complementary CIRCO
def test_complementary_circo_is_deterministic(tmp_path):
    small = dict(num_val=3, num_test=1, gallery_size=60, image_size=32)
    first = _tree_digest(make_complementary_circo(tmp_path / "a", seed=3, **small))
    assert first == _tree_digest(make_complementary_circo(tmp_path / "b", seed=3, **small))
    assert first != _tree_digest(make_complementary_circo(tmp_path / "c", seed=4, **small))


def _palette_summary(path: Path) -> tuple[tuple[int, ...], frozenset[str]]:
    """(background colour, names of the shape colours in the photo), from its pixels (nearest palette colour)."""
    names = [*COLOURS, *BACKGROUNDS]
    palette = np.array([*COLOURS.values(), *BACKGROUNDS.values()], dtype=float)  # [P, 3]
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float).reshape(-1, 1, 3)
    nearest = np.bincount(((pixels - palette) ** 2).sum(-1).argmin(1), minlength=len(names))
    background = names[int(nearest[len(COLOURS):].argmax()) + len(COLOURS)]
    return BACKGROUNDS[background], frozenset(n for n, count in zip(names[:len(COLOURS)], nearest) if count > 40)


def test_complementary_circo_ground_truths_need_the_setting_and_the_edit(tmp_path):
    root = make_complementary_circo(tmp_path, seed=0, num_val=12, num_test=2, gallery_size=100, image_size=64)
    data = CIRCODataset(root, "val", "relative", lambda x: x)
    photos = {name: _palette_summary(data.image_path(name)) for name in data.image_names}
    assert len(photos) >= 14 * 11 and {background for background, _ in photos.values()} == set(BACKGROUNDS.values())
    for query in data.triplets:
        reference, gts = str(query["reference_img_id"]), [str(i) for i in query["gt_img_ids"]]
        setting, reference_colours = photos[reference]
        target_colours = photos[gts[0]][1]
        assert 2 <= len(gts) and all(photos[g] == (setting, target_colours) for g in gts)
        others = [name for name in photos if name not in {reference, *gts}]
        # Near-copies of the reference without the edit: its setting and colours, not ground truths.
        assert sum(photos[n] == (setting, reference_colours) for n in others) >= 2
        # The edited objects in another setting: what the edit says, on another background.
        assert sum(photos[n][1] == target_colours and photos[n][0] != setting for n in others) >= 3
