"""training/run_dir.py's folder rules on hand-made run folders (no training): one run per folder, --resume into
another folder, --overwrite, orphaned temporary files.  End to end through train_cirr.py: tests/test_reliability.py."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from training.run_dir import RunFolderError, claim_output_dir


def make_run(folder: Path, run_id: str, lr: float = 1e-3, checkpoint: bool = True) -> Path:
    """A run folder as training leaves it: args.json with its run id, a metrics log, checkpoints/last.pt."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"run_id": run_id, "lr": lr, "overwrite": False, "resume": None}))
    (folder / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')
    if checkpoint:
        (folder / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")
    return folder / "checkpoints" / "last.pt"


def flags(resume: Path | None = None, overwrite: bool = False, lr: float = 1e-3) -> argparse.Namespace:
    return argparse.Namespace(lr=lr, overwrite=overwrite, resume=None if resume is None else str(resume))


def recorded_run_id(folder: Path) -> str:
    return json.loads((folder / "args.json").read_text())["run_id"]


def test_resume_continues_in_its_own_folder_or_an_empty_one_never_in_another_runs(tmp_path):
    last = make_run(tmp_path / "run", "aaaa")
    other_last = make_run(tmp_path / "other", "bbbb")
    before = {path: path.read_bytes() for path in (tmp_path / "other").rglob("*") if path.is_file()}
    with pytest.raises(RunFolderError, match=rf"{tmp_path / 'other'} holds run bbbb .*not the run of {last}.*empty --output_dir"):
        claim_output_dir(tmp_path / "other", flags(resume=last), resume_run_id="aaaa")
    assert {path: path.read_bytes() for path in before} == before  # nothing written into the other run's folder

    assert claim_output_dir(tmp_path / "run", flags(resume=last), resume_run_id="aaaa")[0] == "aaaa"
    run_id, notes = claim_output_dir(tmp_path / "moved", flags(resume=last), resume_run_id="aaaa")
    assert run_id == recorded_run_id(tmp_path / "moved") == "aaaa"  # the run continues elsewhere under its own id
    assert any("continuing run aaaa" in note for note in notes)
    assert claim_output_dir(tmp_path / "other", flags(resume=other_last), resume_run_id="bbbb")[0] == "bbbb"


def test_overwrite_replaces_a_run_but_never_deletes_the_checkpoint_to_resume_from(tmp_path):
    last = make_run(tmp_path / "run", "aaaa")
    (tmp_path / "run" / "notes.txt").write_text("the user's own file")
    with pytest.raises(RunFolderError, match="--overwrite would delete"):
        claim_output_dir(tmp_path / "run", flags(resume=last, overwrite=True), resume_run_id="aaaa")
    assert last.is_file()
    run_id, notes = claim_output_dir(tmp_path / "run", flags(overwrite=True))
    assert run_id != "aaaa" and recorded_run_id(tmp_path / "run") == run_id
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["args.json", "notes.txt"]
    assert any(note.startswith("--overwrite: deleted run aaaa") for note in notes)


def test_a_fresh_run_is_refused_over_a_run_with_a_checkpoint_or_other_flags_and_restarts_otherwise(tmp_path):
    last = make_run(tmp_path / "run", "aaaa")
    with pytest.raises(RunFolderError, match=f"--resume {last}"):
        claim_output_dir(tmp_path / "run", flags())
    make_run(tmp_path / "stopped", "cccc", checkpoint=False)  # stopped before its first checkpoint
    with pytest.raises(RunFolderError, match=r"stopped before its first checkpoint.*--lr 0\.002"):
        claim_output_dir(tmp_path / "stopped", flags(lr=2e-3))
    run_id, notes = claim_output_dir(tmp_path / "stopped", flags())
    assert run_id == "cccc" and not (tmp_path / "stopped" / "metrics.jsonl").exists()
    assert any("restarting run cccc" in note for note in notes)


def test_orphaned_temporary_files_are_removed_and_other_files_kept(tmp_path):
    last = make_run(tmp_path / "run", "aaaa")
    orphans = [tmp_path / "run" / "checkpoints" / ".last.pt.0123456789ab.tmp", tmp_path / "run" / ".metrics.jsonl.abcdef012345.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"\0" * (1 << 20))
    unrelated = tmp_path / "run" / "checkpoints" / ".notes.tmp"
    unrelated.write_text("not a temporary file of this project")
    _, notes = claim_output_dir(tmp_path / "run", flags(resume=last), resume_run_id="aaaa")
    assert not any(orphan.exists() for orphan in orphans) and unrelated.exists()
    assert any("removed 2 temporary file(s) of interrupted writes (2.0 MiB)" in note for note in notes)
