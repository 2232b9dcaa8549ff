"""The import rule of docs/architecture.md, enforced by reading every import with ``ast``.

Each top-level module or package has a rank; a module may import only modules of a strictly lower rank
(its own package's modules excepted). Scripts sit on top and nothing imports them; no library code
imports ``tests``. A new top-level module must be given a rank here (and a line in the architecture page).

Scripts have no rank, so their own rules are checked on everything they load: the imports of the script
and, transitively, of the project modules those import (imports inside functions included, since scripts
import lazily after parsing their arguments).
"""
from __future__ import annotations

import ast
import functools
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
# What each script must never load, directly or through the project modules it imports.
# Inference tools stay off the training run; CVSI stays off the training run and the plotting code.
# Every script importing cvsi must be listed with the CVSI rule (test_every_cvsi_script_has_the_cvsi_rule).
CVSI_FORBIDDEN = frozenset({"training", "viz"})
SCRIPT_FORBIDDEN: dict[str, frozenset[str]] = {
    "validate": frozenset({"training"}),
    "cirr_test_submission": frozenset({"training"}),
    "retrieve": frozenset({"training"}),
    "app": frozenset({"training"}),
    "zero_shot_cvsi": CVSI_FORBIDDEN,
    "train_phi": CVSI_FORBIDDEN,
}
# No script loads another script. demo.py composes the job from library calls (training.main.run,
# inference.validate_checkpoint, ...), not from the other scripts' main, so it has no exception.


def _top_level_modules(root: Path = ROOT) -> set[str]:
    modules = {path.stem for path in root.glob("*.py")}
    modules |= {path.name for path in root.iterdir() if path.is_dir() and (path / "__init__.py").is_file()}
    return modules - NOT_CODE


@functools.lru_cache(maxsize=None)  # every script's search walks the same files: parse each once
def _import_statements(path: Path, root: Path = ROOT) -> list[tuple[int, list[str]]]:
    """Every import of ``path`` (anywhere in the file) as (line, dotted names it may load).

    ``import a.b`` may load ``a.b``; ``from a.b import c`` may load ``a.b`` and ``a.b.c`` (``c`` may be a
    submodule). Relative imports are resolved against the file's package.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parts = list(path.relative_to(root).with_suffix("").parts)
    package = parts[:-1]  # the package a relative import starts from (for __init__.py, the package itself)
    statements = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            statements.append((node.lineno, [alias.name for alias in node.names]))
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module:
                statements.append((node.lineno, [module] + [f"{module}.{alias.name}" for alias in node.names]))
    return statements


def _imports(path: Path) -> set[str]:
    """Top-level names of the modules that ``path`` imports (anywhere in the file)."""
    return {name.split(".")[0] for _, names in _import_statements(path) for name in names}


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


def _module_file(module: str, root: Path) -> Path | None:
    """The file that runs when the dotted ``module`` is imported, or None if it is no project module."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _loaded_modules(path: Path, root: Path, project: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every project module an import of ``path`` runs, parent packages included."""
    loaded = []
    for line, names in _import_statements(path, root):
        for name in names:
            parts = name.split(".")
            if parts[0] not in project:
                continue
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, a/b/c
                prefix = ".".join(parts[:depth])
                if _module_file(prefix, root) is not None:
                    loaded.append((line, prefix))
    return loaded


def _import_chains(script: str, root: Path = ROOT, stop: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    """Every project module ``script`` loads, with the shortest chain of imports reaching it.

    A chain is the list of hops ``"<file>:<line> imports <module>"`` from the script to the module. Modules
    of the top-level packages in ``stop`` are reached but not followed further.
    """
    project = _top_level_modules(root)
    chains: dict[str, list[str]] = {script: []}
    queue = [script]
    for module in queue:  # breadth first: the first chain found is a shortest one
        if module.split(".")[0] in stop:
            continue
        path = _module_file(module, root)
        for line, loaded in _loaded_modules(path, root, project):
            if loaded not in chains:
                chains[loaded] = chains[module] + [f"{path.relative_to(root).as_posix()}:{line} imports {loaded}"]
                queue.append(loaded)
    return chains


def _script_violations(forbidden: dict[str, frozenset[str]], scripts: frozenset[str],
                       root: Path = ROOT) -> list[str]:
    """One line per import through which a script loads a forbidden package or another script.

    Each line names the script, the forbidden module and the shortest chain from the script to that
    import; chains run through allowed modules only, so every import to cut is listed once.
    """
    project = _top_level_modules(root)
    problems = []
    for script in sorted(scripts):
        if _module_file(script, root) is None:
            continue
        banned = forbidden.get(script, frozenset()) | (scripts - {script})
        for module, chain in sorted(_import_chains(script, root, stop=banned).items()):
            if module.split(".")[0] in banned:
                continue
            path = _module_file(module, root)
            by_line: dict[int, set[str]] = {}
            for line, loaded in _loaded_modules(path, root, project):
                if loaded.split(".")[0] in banned:
                    by_line.setdefault(line, set()).add(loaded)
            for line, loaded_here in sorted(by_line.items()):
                # import a.b.c also runs a/__init__: name only the deepest module of each import
                for target in sorted(m for m in loaded_here if not any(o.startswith(m + ".") for o in loaded_here)):
                    top = target.split(".")[0]
                    what = (f"the script {top}.py" if top in scripts
                            else top if target == top else f"{top} (reaches {target})")
                    hops = chain + [f"{path.relative_to(root).as_posix()}:{line} imports {target}"]
                    problems.append(f"{script}.py must not import {what}: {' -> '.join(hops)}")
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


def test_scripts_stay_off_forbidden_packages_and_other_scripts():
    assert set(SCRIPT_FORBIDDEN) <= SCRIPTS
    assert _script_violations(SCRIPT_FORBIDDEN, SCRIPTS) == []


def test_every_cvsi_script_has_the_cvsi_rule():
    # A new CVSI script cannot escape the rule by being left out of SCRIPT_FORBIDDEN.
    cvsi_scripts = {script for script in SCRIPTS
                    if (ROOT / f"{script}.py").is_file() and "cvsi" in _imports(ROOT / f"{script}.py")}
    assert cvsi_scripts >= {"zero_shot_cvsi", "train_phi"}
    unruled = {script for script in cvsi_scripts if not CVSI_FORBIDDEN <= SCRIPT_FORBIDDEN.get(script, frozenset())}
    assert not unruled, f"give these CVSI scripts CVSI_FORBIDDEN in SCRIPT_FORBIDDEN: {sorted(unruled)}"


def test_the_script_rule_catches_a_transitive_and_a_script_import(tmp_path):
    # The checker itself can fail: a fake inference script whose lazy import of a library module reaches
    # training.main through a relative import, and a script importing another script.
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "__init__.py").write_text("")
    (tmp_path / "training" / "main.py").write_text("def run():\n    pass\n")
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "__init__.py").write_text("from .glue import run\n")
    (tmp_path / "helpers" / "glue.py").write_text("import os\n\nfrom training.main import run\n")
    (tmp_path / "tool.py").write_text("import argparse\n\n\ndef main():\n    from helpers import run\n")
    (tmp_path / "other.py").write_text("def main():\n    import tool\n")
    problems = _script_violations({"tool": frozenset({"training"})}, frozenset({"tool", "other"}), tmp_path)
    assert problems == [
        "other.py must not import the script tool.py: other.py:2 imports tool",
        "tool.py must not import training (reaches training.main): tool.py:5 imports helpers -> "
        "helpers/__init__.py:1 imports helpers.glue -> helpers/glue.py:3 imports training.main",
    ]
    # The same tree passes once nothing forbids it and the scripts are not declared scripts.
    assert _script_violations({}, frozenset({"tool"}), tmp_path) == []
    # On the real tree, the lazy import in demo.py's main is seen once training is forbidden to it.
    demo_rule = dict(SCRIPT_FORBIDDEN, demo=frozenset({"training"}))
    assert any(problem.startswith("demo.py must not import training (reaches training.main): demo.py:")
               for problem in _script_violations(demo_rule, SCRIPTS))
