"""Pictures, curves, reports and the single-query CLI, generated from a tiny synthetic training run."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

import evaluation
import plot_curves
import retrieve
import validate
from conftest import TINY_RUN_EPOCHS
from data_utils import DataError
from dataset_registry import get_dataset, resolve_dataset_root
from evaluation import ModelRetrieval
from inference import load_trained_model
from viz import report as viz_report
from viz.curves import read_epoch_metrics
from viz.examples import QueryExample, caption_words, retrieval_examples, select_examples, target_ranks
from viz.grid import GridLayout, draw_retrieval_grid, grid_paths
from viz.style import FAILURE_COLOUR, GT_COLOUR

CURVES_SIZE = (1200, 450)  # the default figsize (12, 4.5) at 100 dpi


@pytest.fixture(scope="session")
def run(tiny_cirr_run: Path) -> Path:
    """The session's tiny trained run (conftest.py), with its val split of 40 queries."""
    return tiny_cirr_run


@pytest.fixture(scope="session")
def val_features(run: Path):
    """The model, val task and features, encoded once for the grid tests."""
    trained = load_trained_model(run / "checkpoints" / "best.pt", torch.device("cpu"))
    (task,) = get_dataset("cirr").tasks(resolve_dataset_root(trained.train_args["data_root"], "cirr"), "val")
    method = ModelRetrieval(trained.model, "ssn", trained.transform, torch.device("cpu"))
    return trained, task, method.encode_gallery(task), method.encode_queries(task)


def _is_gt(pixel: tuple[int, int, int]) -> bool:
    return tuple(pixel[:3]) == GT_COLOUR


def _frame_is_green(image: Image.Image, layout: GridLayout, row: int, column: int) -> bool:
    """All four sides of the frame around a tile are the ground-truth green."""
    x, y = layout.tile_origin(row, column)
    inset, size, mid = layout.frame // 2 + 1, layout.tile, layout.tile // 2
    sides = [(x + mid, y - inset), (x + mid, y + size - 1 + inset), (x - inset, y + mid), (x + size - 1 + inset, y + mid)]
    return all(_is_gt(image.getpixel(p)) for p in sides)


def _check_frames(image: Image.Image, layout: GridLayout, examples: list[QueryExample]) -> None:
    for row, example in enumerate(examples):
        green = [c for c in range(1, layout.top_k + 1) if _frame_is_green(image, layout, row, c)]
        expected = [] if example.target_position is None else [example.target_position + 1]
        assert green == expected, f"row {row}: green frames at ranks {green}, target at {expected}"
        if example.target is not None:
            assert _frame_is_green(image, layout, row, layout.top_k + 1)  # the ground-truth column
        marker = image.getpixel((layout.margin + 3, layout.tile_origin(row, 0)[1] + 3))
        assert marker == (GT_COLOUR if example.success else FAILURE_COLOUR)


# ---------------------------------------------------------------------------------------------- pieces
def test_select_examples_mixes_successes_and_failures() -> None:
    ranks = [1, 5, 1, 30, 2, 1, 1, 9]
    chosen = select_examples(ranks, 4)
    assert len(chosen) == 4 and len(set(chosen)) == 4
    assert sum(ranks[i] == 1 for i in chosen) == 2
    assert select_examples([1, 1, 1], 2) == [0, 2]  # no failures: successes fill in
    assert sorted(select_examples([3, 4, 1], 5)) == [0, 1, 2]  # fewer queries than asked


def test_target_ranks_follow_the_metric_order() -> None:
    gallery = torch.eye(4)
    gallery[3] = gallery[1]  # a tie with item 1: the lower index wins
    query = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0]])
    ranks = target_ranks(query, gallery, torch.tensor([1, 3, 1]), torch.tensor([-1, -1, 0]))
    assert ranks.tolist() == [1, 2, 1]  # query 2: the reference (item 0) is excluded


def test_caption_words_merge_bpe_pieces() -> None:
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    ids = tokenizer(["make it crimsonish blue"])[0]
    length = int((ids != 0).sum())
    pieces = length - 2 - 3  # BPE pieces of "crimsonish" (cri|mson|ish): start, end and 3 words excluded
    assert pieces > 1
    weights = [0.5] + [0.9, 0.8] + [0.1 * (i + 1) for i in range(pieces)] + [0.3, 0.5] + [0.0] * (len(ids) - length)
    words = caption_words(tokenizer, ids.tolist(), weights)
    assert [w for w, _ in words] == ["make", "it", "crimsonish", "blue"]
    assert words[2][1] == pytest.approx(sum(0.1 * (i + 1) for i in range(pieces)) / pieces)
    assert words[3][1] == pytest.approx(0.3)


def test_grid_frames_the_ground_truth_where_it_is_ranked(tmp_path: Path, run: Path) -> None:
    images = sorted((Path(json.loads((run / "args.json").read_text())["data_root"]) / "cirr_dataset" / "dev").glob("*.png"))
    success = QueryExample(images[0], "make the circle blue", images[1:11], [0.9 - 0.01 * i for i in range(10)],
                           target=images[1], target_rank=1, words=[("make", 0.9), ("the", 0.2), ("circle", 0.6), ("blue", 0.95)])
    failure = QueryExample(images[0], "remove the square", images[1:11], [0.8] * 10, target=images[3], target_rank=3)
    missed = QueryExample(images[0], "add a red triangle", images[1:11], [0.7] * 10, target=images[20], target_rank=37)
    examples = [success, failure, missed]
    path, layout = draw_retrieval_grid(examples, tmp_path / "grid.png", title="hand-made")
    with Image.open(path) as image:
        assert image.size == layout.size(3)
        _check_frames(image.convert("RGB"), layout, examples)
    assert path.stat().st_size < 200_000


# ---------------------------------------------------------------------------------------------- from the run
def test_training_writes_curves_and_report(run: Path) -> None:
    with Image.open(run / "curves.png") as image:
        assert image.size == CURVES_SIZE
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert any(colour == GT_COLOUR for _, colour in colours)  # the best-epoch marker
    report = (run / "report.md").read_text()
    assert "| metric | ours: best val during training by mean (epoch" in report
    assert "| R@1 |" in report and "| Rs@3 |" in report
    assert "43.91" in report and "95.54" in report and "published SSN, ViT-B/32, real CIRR test" in report
    assert "![training curves](curves.png)" in report
    assert "open_clip" in report and "| device | cpu |" in report


def test_grid_from_the_run_matches_the_ranking(tmp_path: Path, val_features) -> None:
    trained, task, gallery, queries = val_features
    examples = retrieval_examples(trained.model, task, trained.transform, queries, gallery, 8, exclude_reference=True)
    assert len(examples) == 8
    # The printed and framed rank is the rank a dense stable sort gives with the reference removed.
    index = {name: i for i, name in enumerate(task.gallery)}
    path_of = task.image_path
    for example in examples:
        (q,) = [q for q, query in enumerate(task.queries) if query.caption == example.caption
                and path_of(query.reference) == example.reference and path_of(query.target) == example.target]
        row = queries[q] @ gallery.T
        row[index[task.queries[q].reference]] = float("-inf")
        order = torch.sort(row, descending=True, stable=True).indices.tolist()
        assert example.target_rank == order.index(index[task.queries[q].target]) + 1
        assert example.retrieved == [path_of(task.gallery[i]) for i in order[:10]]
        assert example.words and all(0 <= w <= 1 for _, w in example.words)
        assert " ".join(w for w, _ in example.words) == example.caption.lower()
    path, layout = draw_retrieval_grid(examples, tmp_path / "grid.png")
    with Image.open(path) as image:
        assert image.size == layout.size(len(examples))
        _check_frames(image.convert("RGB"), layout, examples)


def test_validate_visualize_writes_grid_html_and_report(tmp_path: Path, run: Path) -> None:
    output = tmp_path / "val" / "metrics.json"
    output.parent.mkdir()
    results = validate.main(["--checkpoint", str(run / "checkpoints" / "best.pt"), "--visualize", "4",
                             "--output", str(output), "--device", "cpu", "--precision", "fp32"])
    # Same numbers as the validation inside training (the features are computed once, not by evaluate).
    best = json.loads((run / "summary.json").read_text())["best_metrics"]
    assert results["ssn"] == pytest.approx(best)
    png, page = grid_paths(output, "cirr")
    assert png == tmp_path / "val" / "metrics_cirr_grid.png" and page.suffix == ".html"
    with Image.open(png) as image:
        one_line = GridLayout().size(4)
        # Long captions wrap: every row grows by whole caption lines.
        assert image.size[0] == one_line[0] and (image.size[1] - one_line[1]) % (4 * GridLayout.line_height) == 0
    text = page.read_text()
    captions = json.loads((Path(json.loads((run / "args.json").read_text())["data_root"]) / "cirr_dataset" / "cirr"
                           / "captions" / "cap.rc2.val.json").read_text())
    shown = [c["caption"] for c in captions if f'data-caption="{c["caption"]}"' in text]
    assert len(shown) >= 2 and text.count('class="query ') == 4
    assert text.count("SUCCESS") + text.count("FAILURE") >= 4
    links = [part.split('"')[0] for part in text.split('<img src="')[1:]]
    assert len(links) >= 4 * 11 and all((page.parent / link).is_file() for link in links)
    report = (tmp_path / "val" / "report.md").read_text()  # beside the metrics, the run's own report untouched
    assert "ours: validate.py, ssn" in report and "](metrics_cirr_grid.png)" in report
    assert "](../" in report and "curves.png)" in report  # the run's curves, linked from here
    assert "ours: validate.py" not in (run / "report.md").read_text()


def test_validate_never_replaces_the_run_s_outputs(run: Path) -> None:
    # Without --output every validation gets a new folder; what training wrote stays byte for byte.
    before = {name: (run / name).read_bytes() for name in ("report.md", "curves.png", "summary.json")}
    checkpoint = str(run / "checkpoints" / "best.pt")
    earlier = len(list((run / "validation").glob("best-*")))  # the shared run may hold other tests' validations
    for number in (earlier + 1, earlier + 2):
        validate.main(["--checkpoint", checkpoint, "--visualize", "2", "--device", "cpu"])
        folder = run / "validation" / f"best-{number:03d}"
        assert (folder / "validation.json").is_file() and (folder / "validation_cirr_grid.png").is_file()
        assert "ours: validate.py, ssn" in (folder / "report.md").read_text()
    assert {name: (run / name).read_bytes() for name in before} == before
    assert not (run / "validation.json").exists()


def test_plot_curves_cli(tmp_path: Path, run: Path) -> None:
    path = plot_curves.main([str(run), "--output", str(tmp_path / "c.png"), "--width", "8", "--height", "3"])
    with Image.open(path) as image:
        assert image.size == (800, 300)
    per_epoch = read_epoch_metrics(run / "metrics.jsonl")
    assert list(per_epoch.index) == list(range(1, TINY_RUN_EPOCHS + 1)) and "val/Rs@3" in per_epoch and "train/epoch_loss" in per_epoch
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        plot_curves.main([str(tmp_path / "nothing.jsonl")])


def test_report_failure_is_a_warning(tmp_path: Path, run: Path, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))

    def broken(*args, **kwargs):
        raise RuntimeError("no room for plots")

    monkeypatch.setattr(viz_report, "plot_training_curves", broken)
    logger = logging.getLogger("cir.viz")
    logger.addHandler(caplog.handler)  # the "cir" logger does not propagate to the root
    try:
        assert viz_report.write_run_report_safely(copy) is None
    finally:
        logger.removeHandler(caplog.handler)
    assert "RuntimeError: no room for plots" in caplog.text


# ---------------------------------------------------------------------------------------------- retrieve.py
def test_retrieve_prints_top_k_and_caches(tmp_path: Path, run: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    data = Path(json.loads((run / "args.json").read_text())["data_root"]) / "cirr_dataset"
    gallery = tmp_path / "gallery"
    shutil.copytree(data / "dev", gallery)
    reference = sorted(gallery.glob("*.png"))[0]
    argv = ["--checkpoint", str(run / "checkpoints" / "best.pt"), "--reference", str(reference),
            "--text", "make the circle blue", "--gallery_dir", str(gallery), "--top_k", "5",
            "--cache_dir", str(tmp_path / "cache"), "--device", "cpu", "--precision", "fp32"]
    first = retrieve.main(argv + ["--grid", str(tmp_path / "query.png")])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if re.match(r"\s*\d+  \S+  ", line)]
    assert len(first) == 5 and len(lines) == 5 and "computed and cached" in out
    assert all(Path(line.split()[-1]).is_file() for line in lines)
    assert [s for _, s in first] == sorted((s for _, s in first), reverse=True)
    with Image.open(tmp_path / "query.png") as image:
        assert image.size == GridLayout(top_k=5).size(1)
    assert len(list((tmp_path / "cache").glob("gallery_*.pt"))) == 1

    def no_encoding(*args, **kwargs):
        raise AssertionError("the gallery was encoded again")

    monkeypatch.setattr(evaluation.ModelRetrieval, "encode_gallery", no_encoding)
    second = retrieve.main(argv)
    assert second == first and "loaded from cache" in capsys.readouterr().out
    # A changed gallery is a new cache key.
    (gallery / "extra.png").write_bytes(reference.read_bytes())
    with pytest.raises(AssertionError, match="encoded again"):
        retrieve.main(argv)


def test_retrieve_names_bad_files(tmp_path: Path, run: Path) -> None:
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    good = next((Path(json.loads((run / "args.json").read_text())["data_root"]) / "cirr_dataset" / "dev").glob("*.png"))
    shutil.copy(good, gallery / "good.png")
    base = ["--checkpoint", str(run / "checkpoints" / "best.pt"), "--text", "x", "--gallery_dir", str(gallery),
            "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"]
    with pytest.raises(DataError, match="missing.png"):
        retrieve.main(base + ["--reference", str(tmp_path / "missing.png")])
    (gallery / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        retrieve.main(base + ["--reference", str(good)])
    with pytest.raises(DataError, match="nowhere"):
        retrieve.main(base[:4] + ["--gallery_dir", str(tmp_path / "nowhere"), "--reference", str(good)])
