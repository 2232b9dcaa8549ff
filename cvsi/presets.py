"""Two presets for the options where the CVSI paper and its released code differ.

``--preset paper`` (the default) follows the paper's text and this project's choices; ``--preset release``
reproduces the released code (yyc6631/CVSI). A preset only fills the options left unset on the command
line, so any single choice can be mixed in (e.g. ``--preset release --scoring paper``).

============================  =======================  ==========================================
option                        paper                    release
============================  =======================  ==========================================
``caption_beams``             1 (nucleus sampling)     15 (nucleus sampling within 15 beams)
``top_p``                     0.9                      0.9
``caption_prompt``            "" (none)                "a photo of"
``caption_context``           each (one p_m per C_i)   joined (one p_m on all captions joined)
``llm_max_tokens``            256                      700
``llm_stop``                  none                     a blank line, ``<|endoftext|>``
``llm_answer``                parsed (after marker)    raw (whole answer, stripped)
``on_llm_failure``            strict (stop)            release_fallback (reference captions)
``scoring``                   paper (cosine, Eq. 10)   release (dot product, unnormalised t)
============================  =======================  ==========================================

Prompt wording is not part of a preset: the built-in wording is this project's; the release's own
templates are loaded from its ``utils/prompt_templates.py`` with ``--modify_prompt_file`` /
``--objects_prompt_file`` (see :mod:`cvsi.prompts`).
"""
from __future__ import annotations

import argparse
from typing import Any

__all__ = ["PRESETS", "RELEASE_STOP", "apply_preset"]

RELEASE_STOP = ("\n\n", "<|endoftext|>")

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "caption_beams": 1, "top_p": 0.9, "caption_prompt": "", "caption_context": "each", "llm_max_tokens": 256,
        "llm_stop": [], "llm_answer": "parsed", "on_llm_failure": "strict", "scoring": "paper",
    },
    "release": {
        "caption_beams": 15, "top_p": 0.9, "caption_prompt": "a photo of", "caption_context": "joined",
        "llm_max_tokens": 700, "llm_stop": list(RELEASE_STOP), "llm_answer": "raw",
        "on_llm_failure": "release_fallback", "scoring": "release",
    },
}


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every preset option that is unset (None or absent) in ``args`` from ``args.preset``
    (default 'paper'); options given on the command line win. Returns ``args``, changed in place."""
    name = getattr(args, "preset", None) or "paper"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    args.preset = name
    for option, value in PRESETS[name].items():
        if getattr(args, option, None) is None:
            setattr(args, option, list(value) if isinstance(value, list) else value)
    return args
