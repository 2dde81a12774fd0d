"""The pair probe: each phrase's pick, scored against the generated pairs' answer key."""
from __future__ import annotations

import json

import pytest
import torch
from ovdistill.pipeline import layout
from ovdistill.pipeline.layout import DatasetCache
from ovdistill.trainer.pair_probe import answer_key, phrase_picks, score_picks, summarise


def test_each_phrase_picks_its_most_similar_region():
    regions = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
                                            dim=-1)
    phrases = torch.nn.functional.normalize(torch.tensor([[0.1, 1.0], [1.0, 0.0], [1.0, 0.9]]),
                                            dim=-1)
    assert phrase_picks(regions, phrases).tolist() == [1, 0, 2]


def test_hits_reach_and_chance_by_hand():
    boxes = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 9, 10], [50, 50, 60, 60]],
                         dtype=torch.float32)
    objects = [("red star", [0, 0, 10, 10]), ("blue heart", [50, 50, 60, 60])]
    picks = torch.tensor([1, 3, 0])
    rows = score_picks(boxes, picks, ["red star", "blue heart", "green cross"], objects, 0.5)
    # red star: boxes 0 and 2 overlap it (IoU 1.0, 0.9), the pick (1) does not
    assert rows == [{"phrase": "red star", "hit": False, "reach": True, "chance": 0.5},
                    {"phrase": "blue heart", "hit": True, "reach": True, "chance": 0.25}]
    summary = summarise(rows, {"red star": "novel", "blue heart": "base"})
    assert summary == {"base": {"phrases": 1, "hit": 1.0, "reach": 1.0, "chance": 0.25},
                       "novel": {"phrases": 1, "hit": 0.0, "reach": 1.0, "chance": 0.5}}
    assert summarise([], {})["base"] == {"phrases": 0, "hit": None, "reach": None,
                                         "chance": None}


def test_the_answer_key_reads_the_generator_records_not_the_done_markers(tmp_path):
    folder = tmp_path / layout.PAIRS
    folder.mkdir()
    (folder / "part-00000.json").write_text(json.dumps([
        {"image_id": 3, "objects": [{"category": "red star", "box": [1, 2, 3, 4],
                                     "named": True}]}]))
    (folder / "part-00000.stats.json").write_text(json.dumps({"part": 0, "rows": 1}))
    (folder / "part-00000.parquet").write_bytes(b"")  # only a part's name is read here
    (folder / "part-00001.parquet").write_bytes(b"")  # a real source: no records beside it
    assert answer_key(DatasetCache(tmp_path)) == {3: [("red star", [1.0, 2.0, 3.0, 4.0])]}
    assert answer_key(DatasetCache(tmp_path / "none")) == {}


@pytest.mark.parametrize("iou, hit", [(0.5, True), (0.95, False)])
def test_the_iou_threshold_decides_a_hit(iou, hit):
    boxes = torch.tensor([[0, 0, 9, 10]], dtype=torch.float32)  # IoU 0.9 with the object
    rows = score_picks(boxes, torch.tensor([0]), ["red star"], [("red star", [0, 0, 10, 10])],
                       iou)
    assert rows[0]["hit"] is hit
