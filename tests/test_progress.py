"""utils.progress: a bar on a terminal, periodic one-line progress in a redirected log (issue 15)."""
import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import utils

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def progress_records(caplog):
    """The progress lines, also when another test's setup_logging stopped 'cir' propagating to the root."""
    logger = logging.getLogger("cir.progress")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger="cir.progress"):
        yield caplog
    logger.removeHandler(caplog.handler)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_redirected_output_has_lines_not_bars(tmp_path):
    # A real process whose stdout and stderr go to a file, as `python demo.py > log.txt 2>&1`.
    script = (
        "import time, utils\n"
        "utils.setup_logging(None)\n"
        "progress = utils.progress(range(4), 'encode', interval=0.0)\n"
        "for i in progress:\n"
        "    progress.set_postfix(loss=f'{1 / (i + 1):.2f}')\n"
        "    time.sleep(0.01)\n"
    )
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=True)
    text = log.read_text()
    assert "\r" not in text
    lines = [line for line in text.splitlines() if "| cir.progress |" in line]
    assert len(lines) == 5, text
    assert lines[0].endswith("encode: 1/4 (25%), 0 s, ~0 s left, loss=1.00")
    assert "encode: 4/4 (100%)" in lines[3] and "loss=0.25" in lines[3]
    assert "encode: done, 4 in " in lines[4]


def test_terminal_gets_a_bar_and_no_log_lines(progress_records):
    terminal = _Terminal()
    assert list(utils.Progress(range(3), "encode", interval=0.0, file=terminal)) == [0, 1, 2]
    assert "\r" in terminal.getvalue() and "encode" in terminal.getvalue()
    assert not progress_records.records


def test_a_quick_loop_writes_nothing(progress_records):
    assert list(utils.progress(range(3), "quick", interval=60.0)) == [0, 1, 2]
    assert not progress_records.records


def test_resumed_loop_counts_from_initial(progress_records):
    bar = utils.progress([10, 11], "epoch 1/2", initial=3, interval=0.0)
    assert len(bar) == 2 and bar.total == 5
    list(bar)
    assert "epoch 1/2: 4/5 (80%)" in progress_records.records[0].getMessage()
    assert "epoch 1/2: done, 2 in" in progress_records.records[-1].getMessage()
