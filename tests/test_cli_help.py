"""Every script's --help: a one-line description, the defaults, and no wait for libraries it does not need.

Each script runs in its own process, as a user types it.  The time is measured and printed (``pytest -s``
shows it) but not asserted: it depends on the machine.  What is asserted is what makes it fast: no script
imports torch, open_clip, transformers or Gradio to print its help (the constants its parser needs live in
torch-free modules, the library is imported after parsing).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = (
    "train_cirr.py", "train_fiq.py", "validate.py", "cirr_test_submission.py", "retrieve.py", "demo.py", "benchmark.py",
    "plot_curves.py", "zero_shot_cvsi.py", "train_phi.py", "convert_official_checkpoint.py", "app.py",
    "-m synthetic", "-m synthetic cirr",
)

_RUN = """
import json, runpy, sys
target, args = sys.argv[1], sys.argv[2:]
sys.argv = [target, *args, "--help"]
try:
    if target.startswith("-m "):
        sys.argv[0] = target[3:]
        runpy.run_module(target[3:], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target, run_name="__main__")
except SystemExit as stop:
    code = stop.code
print("IMPORTED " + json.dumps(sorted(set(sys.modules) & {"torch", "open_clip", "transformers", "gradio"})))
sys.exit(code)
"""


def _help(script: str) -> tuple[str, list[str], float]:
    parts = script.split()
    target, args = (" ".join(parts[:2]), parts[2:]) if parts[0] == "-m" else (parts[0], parts[1:])
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _RUN, target, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    text, _, imported = done.stdout.rpartition("IMPORTED ")
    return text, json.loads(imported), seconds


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_describes_the_script_and_shows_defaults(script: str) -> None:
    text, imported, seconds = _help(script)
    print(f"\n{script} --help: {seconds:.2f} s")
    paragraphs = [p.strip() for p in text.split("\n\n")]
    assert paragraphs[0].startswith("usage:")
    description = paragraphs[1]
    assert not description.startswith(("options:", "positional arguments:")) and len(description) > 20, text
    if script != "-m synthetic":  # sub-commands only: their sizes and defaults are listed in the epilog
        assert "(default:" in text
    else:
        assert "size options and their defaults" in text
    assert imported == [], f"{script} --help imports {imported}"


def test_every_script_is_checked() -> None:
    # A new script (a top-level file with a __main__ guard) must show its --help here too.
    scripts = {path.name for path in ROOT.glob("*.py") if "__name__ == \"__main__\"" in path.read_text(encoding="utf-8")}
    assert scripts == {script for script in SCRIPTS if script.endswith(".py")}
