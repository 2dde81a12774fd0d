"""trainer.diagnose: teacher / student agreement on regions with known classes, by hand."""
import numpy as np
import torch
from ovdistill.trainer.diagnose import agreement, format_report, matched_regions

NAMES = ["a", "b", "c"]
TEXT = torch.eye(3)
IS_BASE = torch.tensor([True, True, False])


def test_agreement_by_hand():
    teacher = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 1.0],
                            [0, 1.0, 0]])
    student = torch.tensor([[0, 0, 1.0], [0, 1.0, 0], [0, 0, 1.0], [0.6, 0, 0.8],
                            [0, 0, 1.0]])
    labels = torch.tensor([0, 1, 2, 2, 0])
    r = agreement(student, teacher, TEXT, labels, IS_BASE, NAMES)
    # base (regions 0, 1, 4): the teacher names b for region 4 (labelled a); the student
    # names c, b, c; cosines 0, 1, 0
    assert r["base"] == {"n": 3, "teacher_acc": 0.6667, "student_acc": 0.3333, "cos": 0.3333,
                         "student_top": "c", "student_top_share": 0.6667}
    # novel: student names c for region 2, c for region 3 (0.8 > 0.6); cosines 1 and 0.8
    assert r["novel"] == {"n": 2, "teacher_acc": 1.0, "student_acc": 1.0, "cos": 0.9,
                          "student_top": "c", "student_top_share": 1.0}
    only_base = agreement(student[:2], teacher[:2], TEXT, labels[:2], IS_BASE, NAMES)
    assert only_base["novel"] == {"n": 0}
    assert format_report(only_base).splitlines()[2].split() == ["novel", "0"]


def test_matched_regions_take_the_best_overlapping_box():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 4], [50, 50, 60, 60], [20, 20, 30, 30]],
                     np.float32)
    gt = np.array([[0, 0, 10, 10], [21, 21, 31, 31]], np.float32)
    idx, lab = matched_regions(boxes, gt, np.array([7, 9]), 0.5)
    # IoU: 1.0 with gt0; 0.4 with gt0; 0; 81 / 119 = 0.68 with gt1
    assert idx.tolist() == [0, 3] and lab.tolist() == [7, 9]
    idx, lab = matched_regions(boxes, gt[:0], np.array([]), 0.5)
    assert len(idx) == 0 and len(lab) == 0
