"""Fidelity of caption tokenisation: ``CLIPBackbone.tokenize`` against the official tokenizer, id for id.

The official SSN code tokenises with ``CLIPTokenizer.from_pretrained("openai/clip-vit-base-patch32")`` of its
pinned transformers 4.26.1 — the slow, pure-Python class (the Rust one is ``CLIPTokenizerFast``) — with its
pinned ftfy 6.1.1 installed, so text is cleaned by ``ftfy.fix_text`` (not by the BasicTokenizer fallback for
a missing ftfy), and calls it with ``padding=True`` and no truncation.  Its two files are rebuilt from
open_clip's BPE file (:mod:`tests.reference.hf_clip_tokenizer_files`); the slow class, which transformers 5
no longer has, is re-stated in :mod:`tests.reference.hf_clip_slow_tokenizer`.  With ftfy 6.3.1 that
re-statement gave the same ``input_ids`` and ``attention_mask`` as the real transformers 4.26.1 + ftfy 6.1.1
``from_pretrained`` tokenizer on the captions below and 3050 random strings (letters, digits, punctuation,
whitespace and control characters, accents, emoji, CJK, HTML entities, special-token strings; 50 longer than
77 tokens), with and without truncation (measured once, in a separate environment).

Measured (docs/deviations.md): the ids and the mask are equal up to and including the end-of-text token,
except for two kinds of caption:

* an HTML entity in a caption that also holds ``<``: open_clip unescapes after ftfy, while ftfy (and so the
  official tokenizer) leaves entities alone in text containing ``<``;
* a special-token string: Hugging Face spells them ``<|startoftext|>`` / ``<|endoftext|>``, open_clip
  ``<start_of_text>`` / ``<end_of_text>``, and each tokenizer reads only its own spelling as the token.

After the end of text open_clip pads with 0 and the official with 49407 (masked either way).  A caption of
more than 75 BPE tokens keeps the start token, its first 75 tokens and the end token (open_clip, and Hugging
Face with ``truncation=True, max_length=77``); the official call does not truncate, so its text model, which
has 77 positions, gets a longer row and fails.
"""
from __future__ import annotations

import html
import json
import unicodedata
from pathlib import Path

import ftfy
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer, default_bpe
from transformers import CLIPTokenizer

from model.backbone import create_backbone
from tests.reference.hf_clip_slow_tokenizer import SPLIT_PATTERN, OfficialCLIPTokenizer
from tests.reference.hf_clip_tokenizer_files import EOT_TOKEN, SOT_TOKEN, VOCAB_SIZE, write_hf_clip_tokenizer_files

CONTEXT = 77  # CLIP's text positions
EOT = 49407
OPEN_CLIP_SPELLING = {"<start_of_text>": SOT_TOKEN, "<end_of_text>": EOT_TOKEN}

SCENE = (
    "the dog on the left should be replaced by a larger brown dog that is running across a green field while a "
    "small child in a red jacket throws a yellow ball and two birds fly above the trees near a lake"
)
CAPTIONS = [
    "make the dog a cat",
    "Change The Background To A BEACH",
    "remove the person, add two chairs; keep the table.",
    'change the sign to say "stop!".',  # '!".' holds the byte token '!' (id 0) before the end of text
    "!!!",
    "wow! a red car!!",
    "make it pop!(brighter)",
    "has 3 dogs instead of 12 cats and 1,000 birds",
    "don't show the cat, it's gone and they're back",
    "DON'T keep it, IT'S ugly",
    "don\u2019t use curly quotes \u201cplease\u201d",
    "a caf\u00e9 in S\u00e3o Paulo with cr\u00e8me br\u00fbl\u00e9e",
    "cafe\u0301 with a combining accent",
    "add a \U0001F436 emoji and a \u2764\ufe0f heart",
    "  extra   spaces\tand\nnewlines  ",
    "cats &amp; dogs",
    "cats &amp;amp; dogs",
    "x &lt; y &gt; z",
    "a < b &amp; c",
    "make the shirt <b>bold</b> &amp; red",
    "mojibake caf\u00c3\u00a9",
    "\ufb01ne ligature",
    "\u4e2d\u6587 caption",
    "",
    SCENE + " " + SCENE,
    " ".join(['say "stop!".'] * 20),
    "!" * 100,
    "say hi <|endoftext|> twice",
    "say hi <end_of_text> twice",
]


def open_clip_clean(caption: str) -> str:
    """open_clip's text before lower-casing: ftfy, then HTML-unescaped twice."""
    return html.unescape(html.unescape(ftfy.fix_text(caption)))


def holds_special_string(caption: str) -> bool:
    return any(s in caption.lower() for pair in OPEN_CLIP_SPELLING.items() for s in pair)


def unescapes_beyond_ftfy(caption: str) -> bool:
    fixed = ftfy.fix_text(caption)
    return open_clip_clean(caption) != fixed


def expected_to_differ(caption: str) -> bool:
    """The two measured differences from the official tokenizer (module docstring)."""
    return holds_special_string(caption) or unescapes_beyond_ftfy(caption)


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_hf_clip_tokenizer_files(tmp_path_factory.mktemp("hf_clip_tokenizer"), default_bpe())


@pytest.fixture(scope="module")
def official(hf_files: tuple[Path, Path]) -> OfficialCLIPTokenizer:
    return OfficialCLIPTokenizer(*hf_files)


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("ViT-Tiny-P8-32").eval()


def project_rows(backbone, captions: list[str]) -> list[list[int]]:
    """The project's ids of each caption under its text mask (start token .. first end-of-text token)."""
    ids = backbone.tokenize(captions)
    return [row[mask].tolist() for row, mask in zip(ids, backbone.text_mask(ids))]


def official_rows(official: OfficialCLIPTokenizer, captions: list[str], truncation: bool = True) -> list[list[int]]:
    """The official ids of each caption under its ``attention_mask``."""
    out = official(captions, truncation=truncation, max_length=CONTEXT)
    return [row[: sum(mask)] for row, mask in zip(out["input_ids"], out["attention_mask"])]


def mismatching(backbone, official: OfficialCLIPTokenizer, captions: list[str]) -> set[str]:
    pairs = zip(captions, project_rows(backbone, captions), official_rows(official, captions))
    return {caption for caption, ours, theirs in pairs if ours != theirs}


def test_rebuilt_files_hold_clip_vocabulary_as_open_clip_reads_it(hf_files):
    vocab_file, merges_file = hf_files
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB_SIZE == 49408
    assert (vocab["!"], vocab[SOT_TOKEN], vocab[EOT_TOKEN]) == (0, 49406, 49407)
    merges = merges_file.read_text(encoding="utf-8").strip().split("\n")
    assert merges[0].startswith("#") and len(merges) == 1 + VOCAB_SIZE - 2 * 256 - 2
    # The same token -> id table as the project's tokenizer, up to the spelling of the special tokens.
    open_clip_vocab = {OPEN_CLIP_SPELLING.get(t, t): i for t, i in SimpleTokenizer().encoder.items()}
    assert open_clip_vocab == vocab


def test_ids_and_mask_equal_the_official_tokenizer_up_to_the_end_of_text(backbone, official):
    differing = {c for c in CAPTIONS if expected_to_differ(c)}
    assert mismatching(backbone, official, CAPTIONS) == differing
    assert 0 < len(differing) < len(CAPTIONS) // 4

    # One batch, padding=True: the same width (the longest caption), the same mask, the same ids under it.
    agreeing = [c for c in CAPTIONS if c not in differing]
    ids = backbone.tokenize(agreeing)
    out = official(agreeing, truncation=True, max_length=CONTEXT)
    official_ids, official_mask = torch.tensor(out["input_ids"]), torch.tensor(out["attention_mask"]).bool()
    assert ids.shape == official_ids.shape
    mask = backbone.text_mask(ids)
    assert torch.equal(mask, official_mask)
    assert torch.equal(ids[mask], official_ids[mask])
    # The only difference in the tensors is the padding id.
    assert (ids[~mask] == 0).all() and (official_ids[~mask] == EOT).all() and (~mask).any()


def test_an_entity_next_to_a_less_than_sign_is_unescaped_only_by_open_clip(backbone, official):
    captions = [c for c in CAPTIONS if unescapes_beyond_ftfy(c)]
    assert captions
    for caption in captions:
        # The difference is exactly the extra unescaping: the official ids of the unescaped caption.
        assert project_rows(backbone, [caption]) == official_rows(official, [open_clip_clean(caption)])
        assert project_rows(backbone, [caption]) != official_rows(official, [caption])


def test_each_tokenizer_reads_only_its_own_special_token_spelling(backbone, official):
    hf_spelling, open_clip_spelling = "say hi <|endoftext|> twice", "say hi <end_of_text> twice"
    # Official: <|endoftext|> in the text is an end-of-text id, and the mask goes on to the final one.
    official_ids = official_rows(official, [hf_spelling])[0]
    full = backbone.tokenizer([open_clip_spelling])[0]  # open_clip does the same with its own spelling
    assert official_ids.count(EOT) == 2 and full[: len(official_ids)].tolist() == official_ids
    # The project's length and mask end at the first end of text; the other spelling is plain text for both.
    assert project_rows(backbone, [open_clip_spelling])[0] == official_ids[: official_ids.index(EOT) + 1]
    assert EOT not in project_rows(backbone, [hf_spelling])[0][:-1]
    assert EOT not in official_rows(official, [open_clip_spelling])[0][:-1]


def test_long_captions_are_cut_as_hf_truncation_while_the_official_call_does_not_cut(backbone, official):
    exact, one_over = " ".join(["a"] * (CONTEXT - 2)), " ".join(["a"] * (CONTEXT - 1))
    long_captions = [SCENE + " " + SCENE, " ".join(['say "stop!".'] * 20), one_over]
    untruncated = official_rows(official, [exact, *long_captions], truncation=False)
    assert len(untruncated[0]) == CONTEXT and all(len(row) > CONTEXT for row in untruncated[1:])

    ids = backbone.tokenize([exact, *long_captions])
    assert ids.shape == (4, CONTEXT) and (ids[:, -1] == EOT).all()
    # Start token, the first 75 caption tokens, end token: HF's truncation=True, max_length=77.
    assert ids.tolist() == official([exact, *long_captions], truncation=True, max_length=CONTEXT)["input_ids"]
    assert ids[1:, 1:-1].tolist() == [row[1 : CONTEXT - 1] for row in untruncated[1:]]
    assert (ids[2] == 0).any()  # the byte token '!' (id 0) inside a truncated row does not cut it short


def test_transformers_5_tokenizer_differs_only_where_ftfy_changes_the_text(backbone, hf_files):
    """transformers 5's ``CLIPTokenizer`` (the former fast one: NFC, whitespace, lower case; no ftfy), built
    offline from the same files, against the project: equal wherever cleaning gives the same pre-tokens."""
    fast = CLIPTokenizer.from_pretrained(hf_files[0].parent)
    captions = [c for c in CAPTIONS if not holds_special_string(c)]
    out = fast(captions, padding=True, truncation=True, max_length=CONTEXT)
    fast_rows = [row[: sum(mask)] for row, mask in zip(out["input_ids"], out["attention_mask"])]
    # transformers 5 cleans with NFC (whitespace and lower case as open_clip); open_clip with ftfy + unescaping.
    def pre_tokens(text: str) -> list[str]:
        return SPLIT_PATTERN.findall(text.lower())

    same_text = [pre_tokens(open_clip_clean(c)) == pre_tokens(unicodedata.normalize("NFC", c)) for c in captions]
    assert [p == f for p, f in zip(project_rows(backbone, captions), fast_rows)] == same_text
    assert 0 < same_text.count(False) < same_text.count(True)


@pytest.mark.parametrize("perturbation", ["no_lower_case", "missing_merge", "truncation_drops_end_token"])
def test_the_comparison_catches_a_perturbed_tokenizer(backbone, official, monkeypatch, perturbation):
    tokenizer = SimpleTokenizer(clean="whitespace" if perturbation == "no_lower_case" else "lower")
    if perturbation == "missing_merge":  # BPE without the merge that completes "cat"
        del tokenizer.bpe_ranks[next(pair for pair in tokenizer.bpe_ranks if "".join(pair) == "cat</w>")]
    if perturbation == "truncation_drops_end_token":
        def call(texts: list[str]) -> torch.Tensor:
            return tokenizer(texts, context_length=CONTEXT + 1)[:, :CONTEXT]
    else:
        call = tokenizer
    monkeypatch.setattr(backbone, "tokenizer", call)
    assert mismatching(backbone, official, CAPTIONS) - {c for c in CAPTIONS if expected_to_differ(c)}
