"""Hugging Face CLIP tokenizer files (``vocab.json``, ``merges.txt``) rebuilt offline from CLIP's BPE file.

The official SSN code tokenises with ``CLIPTokenizer.from_pretrained("openai/clip-vit-base-patch32")``, whose
two files are a conversion of OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (shipped inside open_clip).  They are
rebuilt here so the fidelity test runs without downloading them:

* ``merges.txt``: a header line, then merge lines 1 .. 48894 of the gz file (its line 0 is a header too).
  48894 = 49152 − 256 − 2: CLIP's vocabulary of 49408 = 2·256 byte symbols + 48894 merges + 2 specials.
* ``vocab.json``: token → id, in this order (ids 0 .. 49407):
  the 256 byte symbols ``β(b)`` of the byte-to-unicode table β (printable bytes map to themselves, the
  other 68 to ``chr(256 + n)``), the same symbols with the end-of-word mark ``</w>``, the concatenation of
  every merge pair (rank r gets id 512 + r), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

Written from the file format alone (no open_clip tokenizer code), so that a test comparing open_clip's
tokenizer with a Hugging Face tokenizer built on these files compares two independent readings of the BPE.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

N_BYTE_SYMBOLS = 256
N_MERGES = 49152 - N_BYTE_SYMBOLS - 2  # 48894: the merges CLIP keeps
SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 2 * N_BYTE_SYMBOLS + N_MERGES + 2  # 49408
MERGES_HEADER = "#version: 0.2"  # the first line of Hugging Face's merges.txt, skipped by its readers


def byte_to_symbol() -> dict[int, str]:
    """The byte-to-unicode table β, in vocabulary order: printable bytes first (as themselves), then the rest.

    The printable ranges are ``!``..``~``, ``¡``..``¬``, ``®``..``ÿ`` (188 bytes); every other byte
    (whitespace, control characters, ...) becomes ``chr(256 + n)``, n counting those bytes upwards, so
    no symbol is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = sorted(set(range(N_BYTE_SYMBOLS)) - set(printable))
    table = {b: chr(b) for b in printable}
    table.update({b: chr(N_BYTE_SYMBOLS + n) for n, b in enumerate(others)})
    return table


def read_clip_merges(bpe_gz: str | Path) -> list[tuple[str, str]]:
    """The N_MERGES merge pairs of CLIP's BPE file, in rank order (the file's first line is a header)."""
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(pair) != 2 for pair in merges):
        raise ValueError(f"{bpe_gz}: expected {N_MERGES} merge lines of two symbols after the header")
    return merges  # type: ignore[return-value]


def write_hf_clip_tokenizer_files(directory: str | Path, bpe_gz: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (Hugging Face's CLIP format) into ``directory``.

    Returns:
        (vocab_file, merges_file).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = read_clip_merges(bpe_gz)
    symbols = list(byte_to_symbol().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:  # a merge producing an existing token would silently shift the ids
        raise ValueError(f"{bpe_gz}: {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]) + "\n", encoding="utf-8")
    return vocab_file, merges_file
