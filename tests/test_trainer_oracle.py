"""The teacher-as-detector ceiling: scores by hand, and planted regions evaluated end to end."""
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from ovdistill.trainer.config import TrainConfig
from ovdistill.trainer.evaluate import coco_metrics
from ovdistill.trainer.oracle import (
    format_hub,
    hub_cosines,
    mean_region_embedding,
    oracle_detections,
    oracle_scores,
)

CATS = [{"id": 3, "name": "box"}, {"id": 5, "name": "ring"}]  # box base, ring novel
TEXT = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def test_scores_are_objectness_times_softmax_over_cosines():
    emb = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    got = oracle_scores(emb, torch.tensor([0.5, 1.0]), TEXT, temperature=0.1)
    e6, e8 = math.exp(6.0), math.exp(8.0)
    want = [[0.5 * e6 / (e6 + e8), 0.5 * e8 / (e6 + e8)],
            [math.exp(10) / (math.exp(10) + 1), 1 / (math.exp(10) + 1)]]
    assert got.flatten().tolist() == pytest.approx(want[0] + want[1], rel=1e-5)


def _regions(rows):
    """rows: (image_id, rank, box, score, embedding) -> a regions-contract table."""
    emb = np.asarray([r[4] for r in rows], np.float16).reshape(-1)
    box = np.asarray([r[2] for r in rows], np.float32).reshape(-1)
    return pa.table({
        "image_id": pa.array([r[0] for r in rows], pa.int64()),
        "rank": pa.array([r[1] for r in rows], pa.int32()),
        "box": pa.FixedSizeListArray.from_arrays(pa.array(box), 4),
        "score": pa.array([r[3] for r in rows], pa.float32()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb), 2)})


def _gt(path):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "area": 600,
             "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 5, "bbox": [40, 40, 40, 40], "area": 1600,
             "iscrowd": 0}]
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return path


def test_a_teacher_that_names_each_gt_box_gives_ap_one_and_a_wrong_one_zero(tmp_path):
    gt = _gt(tmp_path / "gt.json")
    rows = [(1, 0, [10, 10, 40, 30], 0.9, [1, 0]),      # the box, named box
            (1, 1, [60, 60, 90, 90], 0.01, [0, 1]),     # background, low objectness
            (2, 0, [40, 40, 80, 80], 0.8, [0, 1])]      # the ring, named ring
    sizes = {1: (100, 100), 2: (100, 100)}
    dets = oracle_detections(_regions(rows), TEXT, (3, 5), sizes, TrainConfig(), 100)
    # at tau 0.01 a cosine of 1 against 0 puts all the probability on one class
    assert {(d["image_id"], d["category_id"]) for d in dets if d["score"] > 0.5} == \
        {(1, 3), (2, 5)}
    assert [d["bbox"] for d in dets if d["score"] > 0.5] == [[10, 10, 30, 20],
                                                             [40, 40, 40, 40]]
    m = coco_metrics(gt, dets, {3}, {5})
    assert m["AP50_base"] == pytest.approx(1.0) and m["AP50_novel"] == pytest.approx(1.0)

    wrong = [r if r[0] == 1 else (2, 0, [40, 40, 80, 80], 0.8, [1, 0]) for r in rows]
    dets = oracle_detections(_regions(wrong), TEXT, (3, 5), sizes, TrainConfig(), 100)
    m = coco_metrics(gt, dets, {3}, {5})
    assert m["AP50_novel"] == 0.0 and m["AP50_base"] == pytest.approx(1.0)


def test_a_cache_without_a_teacher_is_one_line_error(tmp_path, capsys):
    from ovdistill.trainer.oracle import main

    assert main(["--manifest", "data_manifests/toy.yaml", "--cache", str(tmp_path),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("error: stage 'teacher' has not finished")
    assert not (tmp_path / "out" / "oracle.json").exists()


def test_hub_cosine_sorted_with_splits():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # the mean is not normalized: cosine, not dot product
    hub = hub_cosines(text, ("box", "ring", "star"), torch.tensor([True, False, False]),
                      np.array([0.0, 2.0], np.float32))
    assert hub == [{"name": "ring", "split": "novel", "cosine": 1.0},
                   {"name": "star", "split": "novel", "cosine": 0.8},
                   {"name": "box", "split": "base", "cosine": 0.0}]
    assert format_hub(hub).endswith("(* novel): ring* 1.000, star* 0.800, box 0.000")
    from ovdistill.trainer.inputs import CacheMismatch

    with pytest.raises(CacheMismatch, match="D=3"):
        hub_cosines(text, ("box", "ring", "star"), torch.tensor([True, False, False]),
                    np.zeros(3, np.float32))


def test_mean_region_embedding_from_the_text_stage_or_the_regions_parts(tmp_path):
    import pyarrow.parquet as pq

    assert mean_region_embedding(tmp_path) == (None, None)
    (tmp_path / "regions").mkdir()
    pq.write_table(_regions([(1, 0, [0, 0, 5, 5], 0.9, [1, 0]),
                             (1, 1, [0, 0, 5, 5], 0.8, [0, 1])]),
                   tmp_path / "regions" / "part-00000.parquet")
    pq.write_table(_regions([(2, 0, [0, 0, 5, 5], 0.9, [1, 0])]),
                   tmp_path / "regions" / "part-00001.parquet")
    mean, source = mean_region_embedding(tmp_path)
    assert mean.tolist() == pytest.approx([2 / 3, 1 / 3]) and source.endswith("regions")
    (tmp_path / "text").mkdir()
    np.save(tmp_path / "text" / "region_mean.npy", np.array([0.25, 0.75], np.float32))
    mean, source = mean_region_embedding(tmp_path)  # the text stage's file wins
    assert mean.tolist() == [0.25, 0.75] and source.endswith("region_mean.npy")
