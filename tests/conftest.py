"""Fixtures shared by several test files, and the ``slow`` marker (``-m "not slow"`` leaves those tests out)."""
from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than 30 s (e.g. a real browser against a served page)")


@pytest.fixture(scope="session")
def app_demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``demo_output/`` as ``demo.py`` lays it out (``data/cirr_dataset``, ``run/checkpoints``).

    The run is a short deterministic training of the tiny model on a small synthetic CIRR (seed 0; about
    half of its 60 validation queries right at R@1), enough for the retrieval page (app.py) to find the
    target of most example queries.
    """
    import train_cirr
    from synthetic import make_synthetic_cirr

    folder = tmp_path_factory.mktemp("app")
    demo = folder / "demo_output"
    data_root = make_synthetic_cirr(demo / "data", seed=0, num_train=960, num_val=60, num_test=6)
    train_cirr.main([
        "--data_root", str(data_root), "--clip_model_name", "ViT-Tiny-P8-32", "--pretrained", "none",
        "--num_epochs", "5", "--batch_size", "32", "--lr", "1e-3", "--optimizer", "adamw", "--grad_clip", "1.0",
        "--num_workers", "0", "--transform", "clip", "--seed", "0", "--device", "cpu", "--save_best",
        "--validation_frequency", "100", "--output_dir", str(demo / "run"),
    ])
    return folder


@pytest.fixture(scope="session")
def app_validation_rankings(app_demo_dir: Path):
    """The val task of :func:`app_demo_dir`'s run and, per retrieval method, each query's full ranking.

    Computed as CIRR validation does (evaluation.ModelRetrieval, retrieval.topk_retrieval, the reference
    left out of its own ranking), without the page's code: ``{method: {query_id: [gallery names]}}``.
    """
    import torch

    from dataset_registry import get_dataset, resolve_dataset_root
    from evaluation import ModelRetrieval
    from inference import load_trained_model
    from model import RETRIEVAL_METHODS
    from retrieval import topk_retrieval

    trained = load_trained_model(app_demo_dir / "demo_output" / "run" / "checkpoints" / "best.pt", torch.device("cpu"))
    (task,) = get_dataset("cirr").tasks(resolve_dataset_root(trained.train_args["data_root"], "cirr"), "val")
    index = {name: i for i, name in enumerate(task.gallery)}
    exclude = torch.tensor([index[q.reference] for q in task.queries])
    rankings = {}
    for name in RETRIEVAL_METHODS:
        method = ModelRetrieval(trained.model, name, trained.transform, torch.device("cpu"))
        _, top = topk_retrieval(method.encode_queries(task), method.encode_gallery(task), len(task.gallery), exclude)
        rankings[name] = {q.query_id: [task.gallery[i] for i in row] for q, row in zip(task.queries, top.tolist())}
    return task, rankings
