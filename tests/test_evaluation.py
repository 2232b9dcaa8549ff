"""Tests for evaluation.py: the one ``evaluate`` gives the numbers of the evaluation it replaced, for every
retrieval method on synthetic CIRR and FashionIQ, and works with any RetrievalMethod and DatasetSpec."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from data_utils import CIRRDataset, FashionIQDataset, build_transform, collate_batch
from dataset_registry import FIQ_CATEGORIES, get_dataset
from evaluation import ModelRetrieval, QueryImages, evaluate, gallery_images
from metrics import cirr_metrics, fiq_metrics, summarize_fiq
from model import RETRIEVAL_METHODS, build_ssn_model
from synthetic import make_synthetic_cirr, make_synthetic_fashioniq

BATCH = 7  # divides none of the set sizes: the last batch is partial


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    torch.manual_seed(0)
    model = build_ssn_model("ViT-Tiny-P8-32", pretrained=None).eval()
    return {
        "model": model,
        "transform": build_transform("clip", model.backbone.image_size),
        "cirr": make_synthetic_cirr(base, seed=2, num_train=8, num_val=16, num_test=4, image_size=32),
        "fashioniq": make_synthetic_fashioniq(base, seed=2, num_train_per_category=4, num_val_per_category=9,
                                              num_test_per_category=3, image_size=32),
    }


@torch.no_grad()
def previous_evaluation(model, dataset, root, transform, method):
    """The evaluation this module replaced (training.evaluate before the registry), restated: the readers'
    relative / classic items through a DataLoader, SSNModel.encode_query / encode_gallery, the metrics.
    Returns the metrics and, per task name, the (gallery, query) features."""
    def encode(data, key, fn):
        names, features, meta = [], [], {}
        for batch in DataLoader(data, batch_size=BATCH, collate_fn=collate_batch):
            features.append(fn(batch).float())
            names += batch.get("name", [])
            for field, values in batch.items():
                if field != key:
                    meta.setdefault(field, []).extend(values)
        return names, torch.cat(features), meta

    def query_fn(batch):
        return model.encode_query(batch["reference_image"], model.backbone.tokenize(batch["caption"]), method)

    if dataset == "cirr":
        names, gallery, _ = encode(CIRRDataset(root, "val", "classic", transform), "image",
                                   lambda b: model.encode_gallery(b["image"], method))
        _, queries, meta = encode(CIRRDataset(root, "val", "relative", transform), "reference_image", query_fn)
        metrics = cirr_metrics(queries, gallery, names, meta["reference_name"], meta["target_name"], meta["members"])
        return metrics, {"cirr": (gallery, queries)}
    per_category, features = {}, {}
    for category in FIQ_CATEGORIES:
        names, gallery, _ = encode(FashionIQDataset(root, "val", [category], "classic", transform), "image",
                                   lambda b: model.encode_gallery(b["image"], method))
        _, queries, meta = encode(FashionIQDataset(root, "val", [category], "relative", transform), "reference_image",
                                  query_fn)
        per_category[category] = fiq_metrics(queries, gallery, names, meta["target_name"])
        features[category] = (gallery, queries)
    return summarize_fiq(per_category), features


@pytest.mark.parametrize("dataset", ["cirr", "fashioniq"])
def test_evaluate_gives_the_previous_numbers_for_every_method(setup, dataset):
    spec = get_dataset(dataset)
    tasks = spec.tasks(setup[dataset], spec.val_split)
    for method in RETRIEVAL_METHODS:
        retrieval = ModelRetrieval(setup["model"], method, setup["transform"], torch.device("cpu"), batch_size=BATCH)
        expected, features = previous_evaluation(setup["model"], dataset, setup[dataset], setup["transform"], method)
        seen = []

        def same_features(task, gallery, queries):
            seen.append(task.name)
            assert torch.equal(gallery, features[task.name][0]) and torch.equal(queries, features[task.name][1])

        assert evaluate(retrieval, tasks, spec, on_features=same_features) == expected, method  # exactly
        assert seen == list(features)


def test_model_retrieval_features_are_the_models(setup):
    (task,) = get_dataset("cirr").tasks(setup["cirr"], "val")
    model, transform = setup["model"], setup["transform"]
    retrieval = ModelRetrieval(model, "sum", transform, "cpu", batch_size=BATCH)
    assert retrieval.name == "sum"
    queries = QueryImages(task, transform)
    item = queries[3]
    assert item["caption"] == task.queries[3].caption
    with torch.no_grad():
        expected = model.encode_query(item["reference_image"][None], model.backbone.tokenize([item["caption"]]), "sum")
        gallery = model.encode_gallery(gallery_images(task, transform)[5]["image"][None], "sum")
    torch.testing.assert_close(retrieval.encode_queries(task)[3:4], expected)
    torch.testing.assert_close(retrieval.encode_gallery(task)[5:6], gallery)
    with pytest.raises(ValueError, match="unknown retrieval method 'clip4cir'"):
        ModelRetrieval(model, "clip4cir", transform, "cpu")


class GivenFeatures:
    """A RetrievalMethod over fixed features (as CVSI's fused features would be)."""

    name = "given"

    def __init__(self, features):
        self.features = features
        self.gallery_calls = 0

    def encode_gallery(self, task):
        self.gallery_calls += 1
        return self.features[task.name][1]

    def encode_queries(self, task):
        return self.features[task.name][0]


def test_evaluate_any_method_with_gallery_encoder_and_callback(setup):
    spec = get_dataset("fashioniq")
    tasks = spec.tasks(setup["fashioniq"], "val", ["shirt", "dress"])
    gen = torch.Generator().manual_seed(0)
    features = {t.name: (F.normalize(torch.randn(len(t.queries), 4, generator=gen), dim=-1),
                         F.normalize(torch.randn(len(t.gallery), 4, generator=gen), dim=-1)) for t in tasks}
    method = GivenFeatures(features)
    expected = summarize_fiq({t.name: fiq_metrics(*features[t.name], t.gallery, [q.target for q in t.queries])
                              for t in tasks})
    seen = []
    metrics = evaluate(method, tasks, spec, on_features=lambda task, g, q: seen.append((task.name, g, q)))
    assert metrics == expected and list(metrics)[:2] == ["shirt_R@10", "shirt_R@50"]
    assert [name for name, _, _ in seen] == ["shirt", "dress"]
    assert all(g is features[n][1] and q is features[n][0] for n, g, q in seen)

    cache = {}

    def cached(task, name, compute):
        assert name == "given"
        if task.name not in cache:
            cache[task.name] = compute()
        return cache[task.name]

    method.gallery_calls = 0
    assert evaluate(method, tasks, "FashionIQ", gallery_encoder=cached) == expected
    assert evaluate(method, tasks, spec, gallery_encoder=cached) == expected
    assert method.gallery_calls == 2  # once per task, the second evaluation read the cache

    short = {**features, "dress": (features["dress"][0][:-1], features["dress"][1])}
    with pytest.raises(ValueError, match="given on dress: .* query features for .* queries"):
        evaluate(GivenFeatures(short), tasks, spec)
    with pytest.raises(ValueError, match="no fashioniq tasks"):
        evaluate(method, [], spec)


def test_evaluate_with_a_new_dataset_spec(setup):
    """A dataset added as one spec: evaluate uses its own metrics and summary, nothing else."""
    cirr = get_dataset("cirr")
    (task,) = cirr.tasks(setup["cirr"], "val")
    spec = dataclasses.replace(
        cirr, name="toy",
        task_metrics=lambda task, q, g: {"hits": float((q @ g.T).argmax(1).eq(0).sum())},
        summarize=lambda per_task: {"total_hits": sum(m["hits"] for m in per_task.values())},
    )
    q = torch.zeros(len(task.queries), 2)
    q[:, 0] = 1
    g = torch.eye(2)[torch.arange(len(task.gallery)) % 2]  # every even gallery image scores 1
    assert evaluate(GivenFeatures({"cirr": (q, g)}), [task], spec) == {"total_hits": float(len(task.queries))}
