"""The retrieval page (app.py, webapp/) without a browser: its engine and callback on a tiny trained checkpoint."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch

import app
import utils
from checkpoint import save_checkpoint
from conftest import validation_rankings
from data_utils import load_image
from evaluation import ModelRetrieval
from model import RETRIEVAL_METHODS
from precision import PRECISIONS
from viz.examples import word_selection
from viz.style import word_colour
from webapp.engine import RetrievalEngine


@pytest.fixture(scope="module")
def page() -> ModuleType:
    """``webapp.page``, imported by the tests that use it: Gradio takes seconds to import, and collecting
    the suite (or running ``-k`` on other tests) should not pay for it."""
    pytest.importorskip("gradio")
    import webapp.page

    return webapp.page


@pytest.fixture(scope="module")
def checkpoint(tiny_cirr_run: Path) -> Path:
    """The session's tiny trained run: the page's code needs a trained checkpoint, not a good one."""
    return tiny_cirr_run / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> RetrievalEngine:
    return RetrievalEngine.open(checkpoint, device="cpu")


def test_search_ranks_like_validation(checkpoint: Path, engine: RetrievalEngine) -> None:
    _, rankings = validation_rankings(checkpoint)
    examples = engine.examples(4)
    assert len(examples) == 4 and len({q.query_id for q in examples}) == 4
    for query in examples:
        result = engine.search(engine.image_path(query.reference), query.caption, top_k=10)
        assert result.excluded == query.reference and result.target == query.target
        for method in RETRIEVAL_METHODS:
            expected = rankings[method][query.query_id]
            assert [hit.name for hit in result.rankings[method]] == expected[:10], method
            assert result.target_ranks[method] == expected.index(query.target) + 1, method
            scores = [hit.score for hit in result.rankings[method]]
            assert scores == sorted(scores, reverse=True)


def test_reference_left_out_by_default_kept_on_request(engine: RetrievalEngine, tmp_path: Path) -> None:
    query = engine.examples(1)[0]
    size = len(engine.task.gallery)
    # An upload is a copy elsewhere: the same bytes still mark it as the gallery's image.
    upload = tmp_path / "upload.png"
    shutil.copyfile(engine.image_path(query.reference), upload)
    left_out = engine.search(upload, query.caption, top_k=size)
    assert left_out.excluded == query.reference
    assert all(query.reference not in [h.name for h in hits] for hits in left_out.rankings.values())
    assert all(len(hits) == size - 1 for hits in left_out.rankings.values())
    kept = engine.search(upload, query.caption, top_k=size, exclude_reference=False)
    assert kept.excluded is None
    assert all(query.reference in [h.name for h in hits] for hits in kept.rankings.values())
    assert all(len(hits) == size for hits in kept.rankings.values())
    # An image that is not in the gallery leaves nothing out (a re-encoded copy is another file).
    from PIL import Image
    Image.open(upload).convert("RGB").save(tmp_path / "other.jpg", quality=90)
    other = engine.search(tmp_path / "other.jpg", query.caption, top_k=size)
    assert other.excluded is None and other.target is None and other.target_ranks is None
    assert all(len(hits) == size for hits in other.rankings.values())


def test_page_callback_shows_words_methods_and_ground_truth(engine: RetrievalEngine, page: ModuleType) -> None:
    query = engine.examples(1)[0]
    reference = engine.image_path(query.reference)
    message, words_html, results_html = page.search_page(engine, str(reference), query.caption, 3, True)
    assert f"ground truth **{query.target}**" in message and "Top 3 of" in message

    image = engine.trained.transform(load_image(reference))[None]
    expected_words = word_selection(engine.trained.model, image, [query.caption])[0]
    assert [w for w, _ in expected_words] == query.caption.split()
    spans = re.findall(r'data-word="([^"]+)" data-weight="([0-9.]+)" style="color:rgb\(([0-9, ]+)\)"', words_html)
    assert [w for w, _, _ in spans] == [w for w, _ in expected_words]
    for (_, weight, colour), (_, expected) in zip(spans, expected_words):
        assert float(weight) == pytest.approx(expected, abs=1e-4)
        assert tuple(int(c) for c in colour.split(",")) == word_colour(expected)

    methods = re.findall(r'data-method="(\w+)"', results_html)
    assert methods == list(RETRIEVAL_METHODS)
    result = engine.search(reference, query.caption, 3)
    for method, block in zip(methods, results_html.split('data-method="')[1:]):
        names = re.findall(r'data-name="([^"]+)"', block)
        assert names == [hit.name for hit in result.rankings[method]]
        framed = re.findall(r'class="hit gt"[^>]*data-name="([^"]+)"', block)
        assert framed == ([query.target] if query.target in names else [])
        assert f"ground truth at rank {result.target_ranks[method]}" in block


def test_bad_input_gets_a_message_not_an_exception(engine: RetrievalEngine, page: ModuleType, tmp_path: Path) -> None:
    reference = str(engine.image_path(engine.examples(1)[0].reference))
    not_image = tmp_path / "gradio_tmp_copy.png"
    not_image.write_text("these are notes, not pixels")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(reference).read_bytes()[:60])
    cases = {
        "no image": (None, "make the circle blue", "pick or upload a reference image"),
        "empty text": (reference, "   ", "type the modification"),
        "no text": (reference, None, "type the modification"),
        # Gradio's raw upload payload: the message names the file as uploaded, not the server copy.
        "non-image upload": ({"path": str(not_image), "orig_name": "notes.png"}, "make it red",
                             "notes.png: not an image file"),
        "truncated image": (str(truncated), "make it red", "truncated.png: unreadable image"),
    }
    for case, (image, text, expected) in cases.items():
        message, words, results = page.search_page(engine, image, text)
        assert message.startswith("**Cannot search:**") and expected in message, (case, message)
        assert str(tmp_path) not in message or case == "truncated image"
        assert words == "" and results == "", case


def test_folder_gallery_is_cached_and_matches_the_dataset_features(
    checkpoint: Path, engine: RetrievalEngine, page: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "photos"
    names = engine.task.gallery[:12]
    for i, name in enumerate(names):
        target = folder / ("nested" if i % 2 else "") / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(engine.image_path(name), target)
    encodings = []
    encode_gallery = ModelRetrieval.encode_gallery

    def counting(self: ModelRetrieval, task):
        encodings.append(self.name)
        return encode_gallery(self, task)

    monkeypatch.setattr(ModelRetrieval, "encode_gallery", counting)
    first = RetrievalEngine.open(checkpoint, folder, cache_dir=tmp_path / "cache", device="cpu")
    # SSN, and one encoding the three baselines share; an entry per method in the cache.
    assert encodings == ["ssn", "image"] and len(list((tmp_path / "cache").iterdir())) == len(RETRIEVAL_METHODS)
    second = RetrievalEngine.open(checkpoint, folder, cache_dir=tmp_path / "cache", device="cpu")
    assert encodings == ["ssn", "image"]  # all from the cache
    order = [engine.task.gallery.index(Path(path).stem) for path in first.task.gallery]
    for method in RETRIEVAL_METHODS:
        torch.testing.assert_close(first.gallery_features[method], engine.gallery_features[method][order])
        torch.testing.assert_close(second.gallery_features[method], first.gallery_features[method])
    # The baselines rank against one shared gallery encoding.
    assert torch.equal(first.gallery_features["image"], first.gallery_features["sum"])

    reference = first.task.gallery[3]
    result = first.search(reference, "make the circle blue", top_k=20)
    assert result.excluded == reference and result.target is None
    assert all(len(hits) == len(names) - 1 for hits in result.rankings.values())
    assert first.examples(3)[0].caption == ""
    # Folder images are shown by their path inside the folder.
    _, _, results_html = page.search_page(first, reference, "make the circle blue", len(names))
    shown = re.findall(r'<span class="name">([^<]+)</span>', results_html)
    assert len(shown) == len(RETRIEVAL_METHODS) * (len(names) - 1)
    assert all(not name.startswith("/") and (folder / name).is_file() for name in shown)
    assert any(name.startswith("nested/") for name in shown)


def test_startup_errors_are_one_line(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    """As ``python app.py ...`` ends (utils.run_cli): exit status 1, one line on stderr naming the problem."""
    not_checkpoint = tmp_path / "notes.pt"
    not_checkpoint.write_text("not a checkpoint")
    zeros = tmp_path / "zeros.pt"
    zeros.write_bytes(b"\x00" * 64)
    no_dataset = tmp_path / "no_dataset.pt"
    save_checkpoint(no_dataset, {"model": {}})
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["model"] = {k: v[..., :1] if v.ndim else v for k, v in state["model"].items()}
    wrong_shapes = tmp_path / "wrong_shapes.pt"
    save_checkpoint(wrong_shapes, state)
    monkeypatch.chdir(tmp_path)  # no demo_output/ here
    cases = [
        ([], "python demo.py --output_dir demo_output"),
        (["--top_k", "0"], "--top_k must be >= 1"),
        (["--checkpoint", str(tmp_path / "missing.pt")], "missing.pt"),
        (["--checkpoint", str(not_checkpoint)], "notes.pt"),
        (["--checkpoint", str(zeros)], "zeros.pt"),
        (["--checkpoint", str(no_dataset)], "no training dataset recorded"),
        (["--checkpoint", str(wrong_shapes)], "wrong_shapes.pt"),
        (["--checkpoint", str(checkpoint), "--gallery_dir", str(tmp_path / "nowhere")], "gallery directory not found"),
        (["--checkpoint", str(checkpoint), "--data_root", str(tmp_path)], str(tmp_path)),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            utils.run_cli(app.main, argv, prog="app.py")
        err = capsys.readouterr().err
        assert exit_info.value.code == 1, argv
        assert err.startswith("app.py: error: ") and expected in err and err.count("\n") == 1, (argv, err)


def test_help_shows_the_options_and_their_defaults() -> None:
    # That --help imports neither torch nor Gradio: tests/test_cli_help.py.
    help_text = app.build_parser().format_help()
    assert "(default: 5)" in help_text and "--gallery_dir" in help_text and "--keep_reference" in help_text
    precision = next(a for a in app.build_parser()._actions if a.dest == "precision")
    assert set(precision.choices) == set(PRECISIONS)


def test_page_builds_with_the_examples(engine: RetrievalEngine, page: ModuleType) -> None:
    import gradio as gr

    blocks = page.build_page(engine, top_k=4, exclude_reference=False, num_examples=3)
    assert isinstance(blocks, gr.Blocks)
    config = blocks.get_config_file()
    ids = {c["props"].get("elem_id"): c for c in config["components"]}
    assert {"reference", "modification", "top_k", "exclude_reference", "search", "results", "words"} <= set(ids)
    assert ids["top_k"]["props"]["value"] == 4 and ids["exclude_reference"]["props"]["value"] is False
    samples = ids["examples"]["props"]["samples"]
    assert [s[1] for s in samples] == [q.caption for q in engine.examples(3)]


def test_render_words_escapes_html(page: ModuleType) -> None:
    words = page.render_words([("<b>", 0.9), ("a&b", 0.1)])
    assert "<b>" not in words and "&lt;b&gt;" in words and "a&amp;b" in words
