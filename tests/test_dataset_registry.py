"""Tests for dataset_registry.py: the registry, root resolution, tasks read from the synthetic benchmarks, scoring,
test outputs and training triplets."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from PIL import Image

from data_utils import CIRCODataset, CIRRDataset, DataError, FashionIQDataset, join_fiq_captions
from dataset_registry import (DATASETS, FIQ_CATEGORIES, DatasetSpec, Query, folder_task, get_dataset, register_dataset,
                              resolve_dataset_root)
from submission import check_cirr_submission
from synthetic import make_synthetic_circo, make_synthetic_cirr, make_synthetic_fashioniq


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return {
        "cirr": make_synthetic_cirr(base, seed=1, num_train=16, num_val=12, num_test=20, image_size=32),
        "fashioniq": make_synthetic_fashioniq(base, seed=1, num_train_per_category=8, num_val_per_category=10,
                                              num_test_per_category=6, image_size=32),
        "circo": make_synthetic_circo(base, seed=1, num_val=8, num_test=4, gallery_size=40, image_size=32),
    }


def random_features(task, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(len(task.queries), dim, generator=gen), dim=-1),
            F.normalize(torch.randn(len(task.gallery), dim, generator=gen), dim=-1))


# ---------------------------------------------------------------------------------------------- registry
def test_get_dataset_accepts_names_and_aliases():
    assert list(DATASETS) == ["cirr", "fashioniq", "circo"]
    for spelling, name in [("CIRR", "cirr"), ("FashionIQ", "fashioniq"), ("fiq", "fashioniq"), ("fashion-iq", "fashioniq"),
                           ("Fashion_IQ", "fashioniq"), ("circo", "circo")]:
        assert get_dataset(spelling).name == name
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; expected one of \['circo', 'cirr', 'fashioniq'\]"):
        get_dataset("imagenet")


def test_register_dataset_rejects_taken_names():
    cirr = get_dataset("cirr")
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(cirr)
    fake = DatasetSpec(**{**{f: getattr(cirr, f) for f in cirr.__dataclass_fields__}, "name": "other", "aliases": ("FIQ",)})
    with pytest.raises(ValueError, match="'FIQ' is already registered .*'fashioniq'"):
        register_dataset(fake)
    assert "other" not in DATASETS


def test_spec_fields_are_checked_and_read_only():
    cirr = get_dataset("cirr")
    fields = {f: getattr(cirr, f) for f in cirr.__dataclass_fields__}
    with pytest.raises(ValueError, match="criterion_files for unknown criteria"):
        DatasetSpec(**{**fields, "criterion_files": {"R@1": "best_r1.pt"}})
    with pytest.raises(ValueError, match="at least one metric"):
        DatasetSpec(**{**fields, "selection_criteria": ()})
    with pytest.raises(TypeError):
        cirr.train_defaults["lr"] = 1.0  # shared by every caller


def test_selection_criteria_and_score():
    cirr, fiq, circo = (get_dataset(n) for n in ("cirr", "fashioniq", "circo"))
    assert (cirr.best_metric, fiq.best_metric, circo.best_metric) == ("mean", "mean", "mAP@10")
    assert set(cirr.criterion_files) == set(cirr.selection_criteria) and not fiq.criterion_files
    metrics = {"mean": 60.0, "harmonic_mean": 50.0, "geometric_mean": 55.0}
    assert cirr.score(metrics) == 60.0 and cirr.score(metrics, "geometric_mean") == 55.0
    with pytest.raises(ValueError, match=r"fashioniq checkpoints are selected by one of \('mean',\), not 'harmonic_mean'"):
        fiq.score(metrics, "harmonic_mean")
    with pytest.raises(KeyError, match="circo checkpoint selection needs metric 'mAP@10'"):
        circo.score(metrics)


def test_resolve_dataset_root_accepts_the_folder_or_its_parent(roots, tmp_path):
    for name, root in roots.items():
        assert resolve_dataset_root(root, name) == root
        assert resolve_dataset_root(root.parent, name) == root
    with pytest.raises(FileNotFoundError, match=f"--data_root {tmp_path}: no fashioniq dataset there .*fashion-iq/captions/"):
        resolve_dataset_root(tmp_path, "fiq")


# ---------------------------------------------------------------------------------------------- tasks
def test_folder_task_is_every_image_below_the_folder(tmp_path):
    for name in ("b.png", "a.jpg", "sub/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    query = Query("0", str(tmp_path / "a.jpg"), "make it red")
    task = folder_task(tmp_path, [query])
    assert sorted(task.gallery) == sorted(str(tmp_path / n) for n in ("a.jpg", "b.png", "sub/c.png"))
    assert task.queries == [query] and task.image_path(task.gallery[0]) == Path(task.gallery[0])
    assert folder_task(tmp_path).queries == []
    with pytest.raises(DataError, match="missing"):
        folder_task(tmp_path / "missing")


def test_cirr_tasks(roots):
    root = roots["cirr"]
    (val,) = get_dataset("cirr").tasks(root, "val")
    reader = CIRRDataset(root, "val", "classic", lambda image: image)
    assert (val.name, val.dataset, val.split, val.root) == ("cirr", "cirr", "val", root)
    assert val.gallery == reader.image_names and val.annotations == reader.triplets
    for query, triplet in zip(val.queries, reader.triplets, strict=True):
        assert query == Query(str(triplet["pairid"]), triplet["reference"], triplet["caption"], triplet["target_hard"],
                              members=tuple(triplet["img_set"]["members"]))
    assert val.image_path(val.gallery[0]) == reader.image_path(val.gallery[0]) and val.image_path(val.gallery[0]).is_file()
    (test,) = get_dataset("cirr").tasks(root, "test1")
    assert test.split == "test1" and all(q.target == "" for q in test.queries)
    with pytest.raises(ValueError, match="CIRR has no categories"):
        get_dataset("cirr").tasks(root, "val", ["dress"])


def test_fashioniq_tasks_one_per_category(roots):
    spec = get_dataset("fashioniq")
    tasks = spec.tasks(roots["fashioniq"], "val")
    assert [t.name for t in tasks] == list(FIQ_CATEGORIES) == list(spec.categories)
    for task in tasks:
        reader = FashionIQDataset(roots["fashioniq"], "val", [task.name], "classic", lambda image: image)
        assert task.gallery == reader.image_names
        assert [q.query_id for q in task.queries] == [f"{task.name}:{i}" for i in range(len(reader.triplets))]
        assert [q.caption for q in task.queries] == [join_fiq_captions(t["captions"]) for t in reader.triplets]
        assert [q.target for q in task.queries] == [t["target"] for t in reader.triplets]
    assert [t.name for t in spec.tasks(roots["fashioniq"], "test", ["toptee", "dress"])] == ["toptee", "dress"]
    with pytest.raises(ValueError, match=r"FashionIQ has no categories \['skirt'\]"):
        spec.tasks(roots["fashioniq"], "val", ["dress", "skirt"])
    with pytest.raises(ValueError, match="non-empty sequence"):
        spec.tasks(roots["fashioniq"], "val", "dress")


def test_circo_tasks(roots):
    (val,) = get_dataset("circo").tasks(roots["circo"], "val")
    reader = CIRCODataset(roots["circo"], "val", "classic", lambda image: image)
    assert val.gallery == reader.image_names
    first = reader.triplets[0]
    assert val.queries[0] == Query(str(first["id"]), str(first["reference_img_id"]), first["relative_caption"],
                                   str(first["target_img_id"]), gt=tuple(str(i) for i in first["gt_img_ids"]),
                                   aspects=tuple(first["semantic_aspects"]))
    (test,) = get_dataset("circo").tasks(roots["circo"], "test")
    assert all(q.target == "" and q.gt == () for q in test.queries)


def test_task_metrics_and_summaries(roots):
    cirr = get_dataset("cirr")
    (task,) = cirr.tasks(roots["cirr"], "val")
    q, g = random_features(task)
    metrics = cirr.task_metrics(task, q, g)
    assert list(metrics)[:8] == ["R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "Avg"]
    assert cirr.summarize({"cirr": metrics}) == metrics
    with pytest.raises(ValueError, match="one task"):
        cirr.summarize({"a": metrics, "b": metrics})

    # Queries equal to their targets' features: every recall is 100 (CIRR removes the reference first).
    index = {name: i for i, name in enumerate(task.gallery)}
    perfect = g[[index[query.target] for query in task.queries]]
    assert cirr.task_metrics(task, perfect, g) == pytest.approx(dict.fromkeys(metrics, 100.0))

    fiq = get_dataset("fashioniq")
    per_task = {t.name: fiq.task_metrics(t, *random_features(t)) for t in fiq.tasks(roots["fashioniq"], "val")}
    assert set(fiq.summarize(per_task)) == {f"{c}_R@{k}" for c in FIQ_CATEGORIES for k in (10, 50)} | {
        "avg_R@10", "avg_R@50", "mean"}

    circo = get_dataset("circo")
    (task,) = circo.tasks(roots["circo"], "val")
    q, g = random_features(task)
    metrics = circo.summarize({"circo": circo.task_metrics(task, q, g)})
    assert {"mAP@5", "mAP@10", "mAP@25", "mAP@50", "R@5", "R@50"} <= set(metrics)


def test_write_test_outputs(roots, tmp_path):
    cirr = get_dataset("cirr")
    (task,) = cirr.tasks(roots["cirr"], cirr.test_split)
    recall, subset = cirr.write_test_outputs(task, *random_features(task), tmp_path, "t")
    assert (recall.name, subset.name) == ("recall_submission_t.json", "recall_subset_submission_t.json")
    check_cirr_submission(json.loads(recall.read_text()), json.loads(subset.read_text()), task.annotations)

    circo = get_dataset("circo")
    (task,) = circo.tasks(roots["circo"], circo.test_split)
    (path,) = circo.write_test_outputs(task, *random_features(task), tmp_path, "t")
    submission = json.loads(path.read_text())
    assert list(submission) == [q.query_id for q in task.queries]
    assert all(len(ids) == min(50, len(task.gallery)) for ids in submission.values())

    fiq = get_dataset("fashioniq")
    for task in fiq.tasks(roots["fashioniq"], fiq.test_split):
        (path,) = fiq.write_test_outputs(task, *random_features(task), tmp_path, "t")
        rankings = json.loads(path.read_text())
        assert path.name == f"fashioniq_{task.name}_test_rankings_t.json"
        assert list(rankings) == [q.query_id for q in task.queries]
        for ranking in rankings.values():
            assert len(set(ranking)) == len(ranking) == min(50, len(task.gallery)) and set(ranking) <= set(task.gallery)


def test_train_datasets(roots):
    cirr = get_dataset("cirr").train_dataset(roots["cirr"], lambda image: image)
    assert isinstance(cirr, CIRRDataset) and cirr.split == "train" and len(cirr) == 16
    fiq = get_dataset("fashioniq").train_dataset(roots["fashioniq"], lambda image: image, ["shirt"])
    assert fiq.dress_types == ["shirt"] and len(fiq) == 8
    assert get_dataset("fashioniq").train_dataset(roots["fashioniq"], lambda image: image).dress_types == list(FIQ_CATEGORIES)
    assert get_dataset("circo").train_dataset is None  # zero-shot only
    for name in ("cirr", "fashioniq"):
        assert set(get_dataset(name).train_defaults) == {"num_epochs", "batch_size", "lr", "lr_step_size", "optimizer",
                                                         "freeze_vision_epoch"}
