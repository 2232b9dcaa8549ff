"""The official caption tokenizer, re-stated: Hugging Face's slow ``CLIPTokenizer`` of transformers 4.26.1.

The official SSN code (pinned ``transformers==4.26.1``, ``ftfy==6.1.1``) builds
``CLIPTokenizer.from_pretrained("openai/clip-vit-base-patch32")`` — the pure-Python class; the Rust-backed one
was ``CLIPTokenizerFast`` — and calls ``tokenizer(captions, padding=True, return_tensors='pt')``.  transformers
5 dropped that class (its ``CLIPTokenizer`` is the former fast one, which normalises with NFC instead of
ftfy), so the fidelity test uses this re-statement.  For a caption ``c`` it computes

0. ``c`` is cut at the exact special-token strings ``<|startoftext|>`` / ``<|endoftext|>``, which map to their
   ids (49406 / 49407); every other piece ``p`` goes through steps 1–3 on its own;
1. ``p' = lower(strip(collapse_whitespace(ftfy.fix_text(p))))`` (with ftfy installed, as in the official
   environment; without ftfy 4.26.1 falls back to BERT's BasicTokenizer, not re-stated);
2. pre-tokens: CLIP's split pattern on ``p'`` (special tokens in other letter case, now lower case, also
   map to their ids);
3. per pre-token: UTF-8 bytes → symbols β(b), ``</w>`` on the last one, then BPE: repeatedly merge every
   left-to-right occurrence of the adjacent pair of lowest merge rank until no pair has a rank;
4. ``input_ids = [sot] + ids[: max_length − 2] + [eot]`` (truncation removes caption tokens from the end),
   right-padded to the longest row with the pad token ``<|endoftext|>`` (id 49407), ``attention_mask`` 1 on
   the real tokens.

Checked against the real transformers 4.26.1 + ftfy 6.1.1 (see ``tests/test_tokenizer.py``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import ftfy
import regex

from .hf_clip_tokenizer_files import EOT_TOKEN, N_MERGES, SOT_TOKEN, byte_to_symbol

# CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits, other-symbol runs.
SPLIT_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
END_OF_WORD = "</w>"
# from_pretrained registers the special tokens as never-split: the text is cut at their exact (case-sensitive)
# occurrences first and each remaining piece is cleaned on its own (ftfy's HTML unescaping looks per piece).
SPECIAL_SPLIT = regex.compile(f"({regex.escape(SOT_TOKEN)}|{regex.escape(EOT_TOKEN)})")


class OfficialCLIPTokenizer:
    """Slow ``CLIPTokenizer(vocab_file, merges_file)`` of transformers 4.26.1, with ftfy installed.

    Args:
        vocab_file: Hugging Face ``vocab.json`` (token → id).
        merges_file: Hugging Face ``merges.txt`` (a header line, then one merge pair per line, by rank).
    """

    def __init__(self, vocab_file: str | Path, merges_file: str | Path) -> None:
        self.vocab: dict[str, int] = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        lines = Path(merges_file).read_text(encoding="utf-8").strip().split("\n")
        self.merge_rank = {tuple(line.split()): rank for rank, line in enumerate(lines[1 : N_MERGES + 1])}
        self.byte_to_symbol = byte_to_symbol()
        self.sot_id, self.eot_id = self.vocab[SOT_TOKEN], self.vocab[EOT_TOKEN]
        self.pad_id = self.unk_id = self.eot_id  # pad and unknown token are both <|endoftext|>

    @staticmethod
    def clean(text: str) -> str:
        """ftfy repair, whitespace runs → one space, strip, lower case (no HTML unescaping beyond ftfy's)."""
        return regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()

    def bpe(self, pre_token: str) -> list[str]:
        """BPE symbols of one pre-token (its bytes already mapped to β symbols)."""
        if pre_token in (SOT_TOKEN, EOT_TOKEN):
            return [pre_token]
        symbols = [*pre_token[:-1], pre_token[-1] + END_OF_WORD]
        while len(symbols) > 1:
            ranked = [(self.merge_rank.get(pair, N_MERGES), pair) for pair in zip(symbols, symbols[1:])]
            rank, (first, second) = min(ranked)
            if rank == N_MERGES:  # no adjacent pair is a merge
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode(self, text: str) -> list[int]:
        """Ids of a caption without start / end tokens."""
        ids = []
        for piece in SPECIAL_SPLIT.split(text):
            if piece in (SOT_TOKEN, EOT_TOKEN):
                ids.append(self.vocab[piece])
                continue
            for pre_token in SPLIT_PATTERN.findall(self.clean(piece)):
                mapped = "".join(self.byte_to_symbol[b] for b in pre_token.encode("utf-8"))
                ids.extend(self.vocab.get(symbol, self.unk_id) for symbol in self.bpe(mapped))
        return ids

    def __call__(
        self, captions: Sequence[str], truncation: bool = False, max_length: int | None = None
    ) -> dict[str, list[list[int]]]:
        """``tokenizer(captions, padding=True[, truncation=True, max_length=max_length])``.

        Returns:
            ``input_ids`` and ``attention_mask``, B rows of the longest row's length.
        """
        rows = []
        for caption in captions:
            ids = self.encode(caption)
            if truncation and max_length is not None:
                ids = ids[: max(max_length - 2, 0)]
            rows.append([self.sot_id, *ids, self.eot_id])
        length = max(len(row) for row in rows)
        return {
            "input_ids": [row + [self.pad_id] * (length - len(row)) for row in rows],
            "attention_mask": [[1] * len(row) + [0] * (length - len(row)) for row in rows],
        }
