"""The annotation files' one reader (pipeline/annotations.py): raw image lists in the file's
order, the unvalidated document for evaluation, one error line for an unreadable file."""
from __future__ import annotations

import json

import pytest
from ovdistill.pipeline.annotations import (
    AnnotationError,
    images_by_id,
    load_annotations,
    read_images,
    read_json_doc,
)
from ovdistill.stages import regions

DOC = {"images": [{"id": 7, "file_name": "b.jpg", "width": 4, "height": 4},
                  {"id": 2, "file_name": "a.jpg", "width": 4, "height": 4}],
       "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 9, 9],
                        "iscrowd": 0, "area": 81}],
       "categories": [{"id": 1, "name": "x"}]}


def test_read_images_keeps_the_files_order_and_records(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(DOC))
    assert read_images(path) == DOC["images"]  # not sorted, nothing validated
    assert images_by_id(read_images(path)) == {7: DOC["images"][0], 2: DOC["images"][1]}
    assert read_json_doc(path) == DOC  # raw: the box overshooting its image is kept
    assert regions.image_files(path) == {7: "b.jpg", 2: "a.jpg"}


def test_an_unreadable_file_is_one_line_from_every_reader(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for read in (read_images, read_json_doc, load_annotations, regions.image_files):
        with pytest.raises(AnnotationError) as e:
            read(bad)
        assert str(e.value).startswith(f"{bad}: cannot read a COCO/LVIS annotation file")
        assert "\n" not in str(e.value)
    missing = tmp_path / "missing.json"
    with pytest.raises(AnnotationError, match="FileNotFoundError"):
        read_images(missing)
    (tmp_path / "noimages.json").write_text("{}")
    with pytest.raises(AnnotationError, match="no `images` list"):
        read_images(tmp_path / "noimages.json")


def test_the_lenient_gt_reader_filters_and_converts_in_file_order():
    from ovdistill.pipeline.annotations import gt_boxes, xywh_to_xyxy

    doc = {"annotations": [
        {"image_id": 2, "category_id": 5, "bbox": [10, 20, 30, 40]},
        {"image_id": 1, "category_id": 6, "bbox": [0.5, 1.5, 2, 3], "iscrowd": 1},
        {"image_id": 2, "category_id": 6, "bbox": [1, 2, 3, 4]},
        {"image_id": 3, "category_id": 5, "bbox": [0, 0, 1, 1]}]}  # no "images": not needed
    assert xywh_to_xyxy([10, 20, 30, 40]) == [10, 20, 40, 60]
    assert gt_boxes(doc) == {2: [([10, 20, 40, 60], 5), ([1, 2, 4, 6], 6)],
                             1: [([0.5, 1.5, 2.5, 4.5], 6)], 3: [([0, 0, 1, 1], 5)]}
    assert gt_boxes(doc, skip_crowd=True).keys() == {2, 3}
    assert gt_boxes(doc, images={2, 1}, categories={6}) == {
        2: [([1, 2, 4, 6], 6)], 1: [([0.5, 1.5, 2.5, 4.5], 6)]}
    assert gt_boxes({"images": []}) == {}
