"""The official CIRCO evaluation (miccunifi/CIRCO, ``src/evaluation.py``), re-stated for the tests.

It scores a predictions file ``{query id: [image ids, best first]}`` against ``annotations/val.json``
the way the official script does:

* the keys must be exactly the query ids ``0 .. N-1`` (the script asserts it before scoring);
* a query id is an index into the annotation list (the official dataset's ``get_target_img_ids``);
* with ``rel_i = [prediction_i in gt_img_ids]``, the per-position precision is
  ``cumsum(rel)_i * rel_i / i`` and ``AP@k = sum_{i<=k} precision_i / min(|gt|, k)``;
* ``Recall@k`` counts the positions ``i <= k`` holding ``target_img_id``;
* mAP@10 per semantic aspect averages ``AP@10`` over the queries listing that aspect.

Values are fractions (the script prints them times 100). Written with numpy as the original, so it
shares no code with the project's metrics.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

OFFICIAL_ASPECTS = ("cardinality", "addition", "negation", "direct_addressing", "compare_change",
                    "comparative_statement", "statement_with_conjunction", "spatial_relations_background",
                    "viewpoint")


def official_circo_scores(data_path: Path, predictions: dict, ranks=(5, 10, 25, 50)
                          ) -> tuple[dict[int, float], dict[int, float], dict[str, float]]:
    """(mAP@k, Recall@k, semantic mAP@10 per aspect present) for a val predictions dict as read from JSON."""
    keys = np.sort(np.array(list(predictions.keys()), dtype=int))
    assert np.all(keys == np.arange(len(predictions))), "The keys of the predictions dictionary must be all the query ids"
    annotations = json.loads((Path(data_path) / "annotations" / "val.json").read_text())

    aps, recalls, aspect_aps = defaultdict(list), defaultdict(list), defaultdict(list)
    for query_id, ranked in predictions.items():
        entry = annotations[int(query_id)]
        gt, target = entry["gt_img_ids"], entry["target_img_id"]
        ranked = np.array(ranked, dtype=int)
        relevant = np.isin(ranked, gt)
        precision = np.cumsum(relevant, axis=0) * relevant / np.arange(1, relevant.shape[0] + 1)
        for rank in ranks:
            aps[rank].append(float(np.sum(precision[:rank]) / min(len(gt), rank)))
            recalls[rank].append(float(np.sum((ranked == target)[:rank])))
        for aspect in entry.get("semantic_aspects", []):
            aspect_aps[aspect].append(float(np.sum(precision[:10]) / min(len(gt), 10)))
    map_at = {rank: float(np.mean(aps[rank])) for rank in ranks}
    recall_at = {rank: float(np.mean(recalls[rank])) for rank in ranks}
    # The official script averages over its fixed aspect list (NaN for an aspect no query has); only the
    # aspects present are returned here.
    semantic = {aspect: float(np.mean(aspect_aps[aspect])) for aspect in OFFICIAL_ASPECTS if aspect_aps[aspect]}
    return map_at, recall_at, semantic
