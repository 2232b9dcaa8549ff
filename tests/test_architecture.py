"""The import rule of docs/architecture.md, enforced by reading every import with ``ast``.

Each top-level module or package has a rank; a module may import only modules of a strictly lower rank
(its own package's modules excepted). Scripts sit on top and nothing imports them; no library code
imports ``tests``. A new top-level module must be given a rank here (and a line in the architecture page).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower rank = more general. The groups are the layers of docs/architecture.md.
RANKS: dict[str, int] = {
    # general helpers
    "utils": 0, "precision": 0, "distributed": 0, "search_choices": 0,
    # data, model, retrieval engine
    "data_utils": 1, "retrieval": 1, "ann": 1, "model": 1, "synthetic": 1,
    # metrics, submissions, checkpoints
    "metrics": 2, "submission": 2, "checkpoint": 2,
    # the dataset registry (readers + metrics + submission writers per dataset)
    "dataset_registry": 3,
    # evaluation and the gallery feature cache
    "evaluation": 4, "feature_cache": 4,
    # visualisation, CVSI, experiment tracking
    "viz": 5, "cvsi": 5, "tracking": 5,
    # loading trained models for validation / submission / retrieval
    "inference": 6,
    # the training run and the interactive page
    "training": 7, "webapp": 7,
    # benchmark helpers (used by benchmark.py and the tests only)
    "benchmarks": 8,
}
SCRIPTS = frozenset({
    "train_cirr", "train_fiq", "validate", "cirr_test_submission", "retrieve", "demo", "benchmark",
    "plot_curves", "zero_shot_cvsi", "convert_official_checkpoint", "train_phi", "app",
})
NOT_CODE = frozenset({"tests", "docs", "conftest"})


def _top_level_modules() -> set[str]:
    modules = {path.stem for path in ROOT.glob("*.py")}
    modules |= {path.name for path in ROOT.iterdir() if path.is_dir() and (path / "__init__.py").is_file()}
    return modules - NOT_CODE


def _imports(path: Path) -> set[str]:
    """Top-level names of the project's modules that ``path`` imports (anywhere in the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _files_of(module: str) -> list[Path]:
    package = ROOT / module
    return sorted(package.rglob("*.py")) if package.is_dir() else [ROOT / f"{module}.py"]


def _violations(ranks: dict[str, int], scripts: frozenset[str]) -> list[str]:
    modules = _top_level_modules()
    problems = []
    for module in sorted(modules):
        for path in _files_of(module):
            for imported in sorted(_imports(path) & (modules | {"tests"})):
                if imported == module:
                    continue
                where = path.relative_to(ROOT)
                if imported == "tests":
                    problems.append(f"{where} imports tests")
                elif imported in scripts:
                    problems.append(f"{where} imports the script {imported}")
                elif module not in scripts and ranks[imported] >= ranks[module]:
                    problems.append(f"{where} (rank {ranks[module]}) imports {imported} (rank {ranks[imported]})")
    return problems


def test_every_module_has_a_place():
    unplaced = sorted(_top_level_modules() - set(RANKS) - SCRIPTS)
    assert not unplaced, f"give these modules a rank in RANKS and a line in docs/architecture.md: {unplaced}"


def test_imports_never_point_up():
    assert _violations(RANKS, SCRIPTS) == []


def test_cvsi_and_inference_stay_off_the_training_loop_and_each_other_s_layers():
    # The named rules, spelled out on top of the ranks.
    assert RANKS["cvsi"] < RANKS["training"] and RANKS["cvsi"] <= RANKS["viz"]
    assert RANKS["inference"] < RANKS["training"]


def test_no_cvsi_module_imports_training_or_viz():
    # Every file of the package, the demo's CLIP training included: CVSI stays usable without the SSN
    # training loop and the plotting code.
    files = {path.relative_to(ROOT).as_posix(): _imports(path) for path in _files_of("cvsi")}
    assert {"cvsi/clip_training.py", "cvsi/phi_training.py", "cvsi/demo.py"} <= set(files)
    assert {path: sorted(names & {"training", "viz"}) for path, names in files.items() if names & {"training", "viz"}} == {}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_scripts_are_thin_mains(script):
    path = ROOT / f"{script}.py"
    if not path.is_file():
        pytest.skip(f"{script}.py not present")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "main" in functions, f"{script}.py has no main(argv)"
    assert any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def test_the_rule_catches_an_upward_import():
    # The checker itself can fail: ranked above training (which imports it), evaluation becomes a violation;
    # declared a script, metrics makes every importer of it a violation.
    ranks = dict(RANKS, evaluation=RANKS["training"] + 1)
    assert any("imports evaluation" in problem for problem in _violations(ranks, SCRIPTS))
    assert any("imports the script" in problem for problem in _violations(RANKS, SCRIPTS | {"metrics"}))
