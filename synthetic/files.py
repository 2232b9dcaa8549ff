"""How the generators write files: JSON with a trailing newline, PNG at a fixed compression (both deterministic)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["write_json", "save_png"]


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON (indent 1, trailing newline), creating the parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def save_png(image: Image.Image, path: Path) -> None:
    """``image`` as PNG, creating the parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=1)  # level 1: fast, still deterministic
