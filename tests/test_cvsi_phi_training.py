"""Φ trained from captions alone (LinCIR-style, cvsi/phi_training.py and train_phi.py): keyword masking,
the loss, that it learns, exact resumption and the command line."""
from __future__ import annotations

import json
import random
import sys
import types

import pytest
import torch

import train_phi
from cvsi.phi import load_phi
from cvsi.phi_training import (
    PhiTrainingConfig, build_models, heuristic_tagger, keyword_runs, mask_caption, phi_loss, read_caption_corpus,
    reconstruction, spacy_tagger, train_phi as train,
)
from cvsi.pseudo_tokens import encode_ids_with_pseudo_words, placeholder_token_id
from data_utils import DataError

CLIP = "ViT-Tiny-P8-32"


def _corpus(path, size=200, seed=0):
    """Captions whose keyword runs all differ while the masked text is the same: "$ in $ and $"."""
    rng = random.Random(seed)
    colours, shapes = "red blue green yellow purple orange black white".split(), "circle square triangle star".split()
    places = "left right top bottom middle corner".split()
    captions = set()
    while len(captions) < size:
        captions.add(f"a {rng.choice(colours)} {rng.choice(shapes)} in the {rng.choice(places)} "
                     f"and a {rng.choice(colours)} {rng.choice(shapes)}")
    path.write_text("\n".join(sorted(captions)) + "\n", encoding="utf-8")
    return path


def _config(tmp_path, **overrides):
    settings = dict(captions=[str(_corpus(tmp_path / "captions.txt"))], output_dir=str(tmp_path / "run"),
                    clip_model_name=CLIP, pretrained=None, batch_size=16, learning_rate=3e-3, max_train_steps=40,
                    checkpointing_steps=20, log_every=20, seed=0)
    return PhiTrainingConfig(**{**settings, **overrides})


# ------------------------------------------------------------------------------------------ masking
def test_keyword_runs_follow_lincirs_rule_and_the_heuristic_tagger_finds_them():
    # LinCIR: maximal runs of NOUN / PROPN / ADJ / DET words, as spaCy tags "a man riding a brown horse".
    text = "a man riding a brown horse"
    tagged = [(0, 1, "DET"), (2, 5, "NOUN"), (6, 12, "VERB"), (13, 14, "DET"), (15, 20, "ADJ"), (21, 26, "NOUN")]
    assert [text[s:e] for s, e in keyword_runs(tagged)] == ["a man", "a brown horse"]
    assert [(s, e) for s, e in keyword_runs(heuristic_tagger(text))] == keyword_runs(tagged)
    rng = random.Random(0)
    assert mask_caption("two dogs playing with a red ball.", heuristic_tagger, rng) == "two $ playing with $ ."
    assert mask_caption("the building is tall", heuristic_tagger, rng) == "$ is $"
    assert mask_caption("", heuristic_tagger, rng) == "a photo of $"
    # Without a keyword, one random word is masked (LinCIR's fallback).
    assert mask_caption("is with of", heuristic_tagger, random.Random(3)).split().count("$") == 1


def test_masked_captions_hold_the_placeholder_token(tmp_path):
    backbone, _ = build_models(_config(tmp_path))
    placeholder = placeholder_token_id(backbone)
    for caption in ("a photo of a cat, sitting on the sofa!", "a man's red hat.", "(a dog)"):
        masked = mask_caption(caption, heuristic_tagger, random.Random(0))
        ids = backbone.tokenize([masked])[0]
        assert (ids == placeholder).sum() == masked.split().count("$") >= 1, masked


def test_spacy_tagger_uses_spacys_coarse_tags(monkeypatch):
    class Token:
        def __init__(self, text, idx, pos):
            self.text, self.idx, self.pos_ = text, idx, pos

    def load(name):
        assert name == "en_core_web_sm"
        return lambda text: [Token("a", 0, "DET"), Token("dog", 2, "NOUN"), Token("runs", 6, "VERB")]

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))
    assert mask_caption("a dog runs", spacy_tagger(), random.Random(0)) == "$ runs"
    monkeypatch.setitem(sys.modules, "spacy", None)
    with pytest.raises(ImportError, match="pip install spacy"):
        spacy_tagger()


# ------------------------------------------------------------------------------------------ corpus
def test_caption_corpus_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("A Dog $ runs\n\n  a cat \n", encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps(["a cat", ["a cow", "a hen"]]), encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"index_names": ["x"], "target_captions": [["a fox", "a pig"]]}))
    (tmp_path / "d.json").write_text(json.dumps({"img1": "an owl", "img2": ["a bat"]}))
    assert read_caption_corpus([tmp_path / n for n in ("a.txt", "b.json", "c.json", "d.json")]) == \
        ["a dog runs", "a cat", "a cow", "a hen", "a fox", "a pig", "an owl", "a bat"]
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        read_caption_corpus([tmp_path / "bad.json"])
    with pytest.raises(DataError, match="x.csv: expected a .txt"):
        read_caption_corpus([tmp_path / "x.csv"])
    with pytest.raises(DataError, match="missing.txt: cannot read"):
        read_caption_corpus([tmp_path / "missing.txt"])


# ------------------------------------------------------------------------------------------ loss and learning
def test_loss_is_the_mse_of_the_pseudo_word_encoding_to_the_caption_embedding(tmp_path):
    config = _config(tmp_path)
    backbone, phi = build_models(config)
    phi.eval()
    placeholder = placeholder_token_id(backbone)
    captions = ["a red circle in the left and a blue star", "a white square in the top and a green circle"]
    masked = [mask_caption(c, heuristic_tagger, random.Random(0)) for c in captions]
    caption_ids, masked_ids = backbone.tokenize(captions), backbone.tokenize(masked)
    e = backbone.encode_text(caption_ids).embeds
    expected = ((encode_ids_with_pseudo_words(backbone, masked_ids, phi(e), placeholder) - e) ** 2).mean()
    torch.testing.assert_close(phi_loss(backbone, phi, caption_ids, masked_ids, placeholder, 0.0), expected)
    assert reconstruction(backbone, phi, captions, masked)["mse"] == pytest.approx(expected.item(), rel=1e-5)
    # With noise the loss is the same formula on Φ(e + σ n): σ ~ U(0, s) per caption, n ~ N(0, I).
    generator = torch.Generator().manual_seed(5)
    sigma, noise = torch.rand(2, 1, generator=generator) * 2.0, torch.randn(e.shape, generator=generator)
    noisy = ((encode_ids_with_pseudo_words(backbone, masked_ids, phi(e + sigma * noise), placeholder) - e) ** 2).mean()
    torch.testing.assert_close(phi_loss(backbone, phi, caption_ids, masked_ids, placeholder, 2.0,
                                        torch.Generator().manual_seed(5)), noisy)


def test_phi_learns_to_restore_the_masked_words_of_its_captions(tmp_path):
    config = _config(tmp_path)
    result = train(config)
    backbone, initial = build_models(config)  # the random Φ the run started from
    trained = load_phi(result["latest"], backbone.embed_dim, backbone.text_width)
    captions = read_caption_corpus(config.captions)
    masked = [mask_caption(c, heuristic_tagger, random.Random(0)) for c in captions]
    assert set(masked) == {"$ in $ and $"}  # only the pseudo word can tell the captions apart
    before, after = reconstruction(backbone, initial, captions, masked), reconstruction(backbone, trained, captions, masked)
    assert after["cosine"] > before["cosine"] + 0.4 and after["mse"] < before["mse"] / 4
    assert after["recall@1"] >= max(0.08, 10 * before["recall@1"])  # its own caption among 200
    saved = torch.load(result["latest"], weights_only=True)
    assert set(saved) == {"epoch", "Phi"} and saved["epoch"] == 40  # LinCIR's layout, the step as 'epoch'
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == \
        ["phi_000000020.pt", "phi_000000040.pt", "phi_latest.pt", "train_state.pt"]


# ------------------------------------------------------------------------------------------ resume and CLI
def _args(tmp_path, out, *extra):
    return ["--captions", str(_corpus(tmp_path / "captions.txt")), "--output_dir", str(out), "--clip_model_name", CLIP,
            "--pretrained", "none", "--batch_size", "8", "--learning_rate", "3e-3", "--checkpointing_steps", "3",
            "--val_fraction", "0.25", *extra]


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path, capsys):
    straight = train_phi.main(_args(tmp_path, tmp_path / "a", "--max_train_steps", "6", "--dropout", "0.5"))
    train_phi.main(_args(tmp_path, tmp_path / "b", "--max_train_steps", "3", "--dropout", "0.5"))
    resumed = train_phi.main(_args(tmp_path, tmp_path / "b", "--max_train_steps", "6", "--dropout", "0.5", "--resume"))
    assert "Φ after step 6" in capsys.readouterr().out
    one, two = (torch.load(r["latest"], weights_only=True)["Phi"] for r in (straight, resumed))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert resumed["history"] == straight["history"] and [row["step"] for row in straight["history"]] == [3, 6]
    assert {"val_mse", "val_cosine", "val_recall@1"} <= set(straight["history"][0]) and straight["best"].is_file()

    with pytest.raises(SystemExit, match="already holds a Φ training run; pass --resume"):
        train_phi.main(_args(tmp_path, tmp_path / "b", "--max_train_steps", "9"))
    with pytest.raises(SystemExit, match=r"trained with other settings \(dropout\)"):
        train_phi.main(_args(tmp_path, tmp_path / "b", "--max_train_steps", "9", "--dropout", "0.1", "--resume"))
    with pytest.raises(SystemExit, match="fewer than one batch"):
        train_phi.main(_args(tmp_path, tmp_path / "c", "--batch_size", "500"))


def test_help_shows_lincirs_defaults(capsys):
    with pytest.raises(SystemExit):
        train_phi.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 256)", "(default: 0.0001)", "(default: 20000)", "(default: 0.5)", "(default: keywords)"):
        assert shown in text
