"""Evaluation metrics: planted detections against COCO / LVIS ground truth."""
import contextlib
import io
import json

import pytest
from ovdistill.trainer.evaluate import (
    coco_metrics,
    format_per_class,
    format_row,
    lvis_metrics,
    restrict_gt,
    result_suffix,
    top_class,
)

CATS = [{"id": 1, "name": "box"}, {"id": 2, "name": "ball"}, {"id": 3, "name": "bar"},
        {"id": 4, "name": "ring"}]
BASE, NOVEL = {1, 2, 3}, {4}
# (image_id, category_id, [x, y, w, h]); category 3 has no ground truth
GT = [(1, 1, [10, 10, 20, 20]), (1, 4, [50, 50, 30, 20]), (2, 2, [5, 5, 40, 40]),
      (2, 1, [60, 10, 20, 30]), (3, 4, [0, 0, 64, 32])]


def _write_gt(path, lvis=False):
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2, 3)]
    cats = [dict(c) for c in CATS]
    if lvis:
        for im in images:
            im.update(neg_category_ids=[], not_exhaustive_category_ids=[])
        for c in cats:
            c["frequency"] = "r" if c["id"] in NOVEL else "f"
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3],
             "iscrowd": 0} for k, (i, c, b) in enumerate(GT)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def _perfect():
    return [{"image_id": i, "category_id": c, "bbox": b, "score": 1.0} for i, c, b in GT]


def test_perfect_detections_give_ap_one(tmp_path):
    m = coco_metrics(_write_gt(tmp_path / "gt.json"), _perfect(), BASE, NOVEL)
    for k in ("AP_all", "AP50_all", "AP_base", "AP50_base", "AP_novel", "AP50_novel"):
        assert m[k] == pytest.approx(1.0), k
    assert m["AP50_per_class"] == {"box": pytest.approx(1.0), "ball": pytest.approx(1.0),
                                   "bar": None, "ring": pytest.approx(1.0)}
    row = format_row({"mode": "vild", **m})
    assert row.splitlines()[1].split() == ["vild"] + ["100.0"] * 6
    assert format_per_class({**m, "novel_categories": ["ring"]}) == \
        "AP50 per class (* novel): box 100.0, ball 100.0, bar -, ring* 100.0"


def test_missing_novel_and_shifted_boxes(tmp_path):
    gt = _write_gt(tmp_path / "gt.json")
    dets = [d for d in _perfect() if d["category_id"] not in NOVEL]
    m = coco_metrics(gt, dets, BASE, NOVEL)
    assert m["AP50_novel"] == 0.0 and m["AP50_base"] == pytest.approx(1.0)
    assert m["AP50_all"] == pytest.approx(2 / 3)  # box, ball found; ring not
    assert coco_metrics(gt, [], BASE, NOVEL)["AP50_all"] == 0.0


def test_subset_averages_agree_with_cocoeval_summary(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_path = _write_gt(tmp_path / "gt.json")
    dets = _perfect()
    dets[0]["bbox"] = [13, 12, 20, 20]  # IoU ~0.6
    dets[2]["score"] = 0.3
    dets[1]["score"] = 0.5  # a ring found after the false ring below
    dets.append({"image_id": 2, "category_id": 4, "bbox": [0, 60, 30, 30], "score": 0.9})
    m = coco_metrics(gt_path, dets, BASE, NOVEL)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert m["AP_all"] == pytest.approx(ev.stats[0])
    assert m["AP50_all"] == pytest.approx(ev.stats[1])
    assert 0 < m["AP_base"] < 1 and m["AP50_novel"] < 1


def test_lvis_path_reports_frequency_groups(tmp_path):
    gt = _write_gt(tmp_path / "lvis.json", lvis=True)
    m = lvis_metrics(gt, _perfect(), BASE, NOVEL)
    assert m["APr"] == pytest.approx(1.0) and m["APf"] == pytest.approx(1.0)
    assert m["AP_novel"] == pytest.approx(1.0) and m["AP50_all"] == pytest.approx(1.0)
    dets = [d for d in _perfect() if d["category_id"] not in NOVEL]
    m = lvis_metrics(gt, dets, BASE, NOVEL)
    assert m["APr"] == 0.0 and m["APf"] == pytest.approx(1.0)


@pytest.mark.parametrize("lvis", [False, True])
def test_base_vocabulary_scores_only_base_categories(tmp_path, lvis):
    gt = _write_gt(tmp_path / "gt.json", lvis=lvis)
    sub = restrict_gt(gt, [1, 2, 3], tmp_path / "base.json", sorted(BASE))
    kept = json.loads(sub.read_text())
    assert [c["id"] for c in kept["categories"]] == [1, 2, 3]
    assert len(kept["annotations"]) == 3 and len(kept["images"]) == 3  # the two rings dropped
    assert restrict_gt(gt, [1, 2, 3], tmp_path / "same.json") == gt  # nothing to drop

    base_dets = [d for d in _perfect() if d["category_id"] in BASE]
    metrics = lvis_metrics if lvis else coco_metrics
    m = metrics(sub, base_dets, BASE, set())
    assert m["AP50_base"] == pytest.approx(1.0) and m["AP50_all"] == pytest.approx(1.0)
    assert m["AP50_novel"] is None
    # a ring called a box is a false box: it costs box AP once novel GT is out of the file
    wrong = base_dets + [{"image_id": 1, "category_id": 1, "bbox": [50, 50, 30, 20],
                          "score": 1.0}]
    assert metrics(sub, wrong, BASE, set())["AP50_per_class"]["box"] < 1.0


def test_top_class_share_of_planted_detections():
    names = {c["id"]: c["name"] for c in CATS}
    dets = [{"image_id": 1, "category_id": c, "bbox": [0, 0, 5, 5], "score": 0.5}
            for c in [4] * 7 + [1, 2, 2]]
    assert top_class(dets, names) == {"name": "ring", "share": 0.7}
    # a tie goes to the lower category id; no detections, no top class
    assert top_class(dets[6:], names) == {"name": "ball", "share": 0.5}
    assert top_class([], names) == {"name": None, "share": None}
    row = format_row({"mode": "vild", "AP50_all": 0.1, "top_class": {"name": "ring",
                                                                     "share": 0.7}})
    assert row.splitlines()[0].endswith("top class (share of detections)")
    assert row.splitlines()[1].endswith("  ring 70.0%")


def test_result_files_are_named_by_what_was_evaluated():
    assert result_suffix(False, False) == ""
    assert result_suffix(True, True) == "_ensemble_base_vocab"
    assert result_suffix(False, False, "mean_logit") == "_mean_logit"
    assert result_suffix(True, False, None) == "_ensemble"
