"""The README's tour: one image from manifest to loss in at most six files, all of which exist,
and the shard members the layout names are the ones the pack stage writes and the trainer
decodes."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from ovdistill.pipeline import layout
from ovdistill.trainer import data

REPO = Path(__file__).resolve().parents[1]


def tour_files() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Tour\n", 1)[1].split("\n## ", 1)[0]
    steps = re.findall(r"^\d+\. `([^`]+)`", section, flags=re.MULTILINE)
    return steps


def test_the_tour_names_at_most_six_files_that_exist():
    files = tour_files()
    assert 1 <= len(files) <= 6, files
    assert len(set(files)) == len(files)
    for f in files:
        assert (REPO / f).is_file(), f
    assert files[0].endswith("manifests.py") and files[-1] == "trainer/losses.py"


def test_shard_members_are_what_pack_writes_and_data_decodes():
    tree = ast.parse((REPO / "stages" / "pack.py").read_text())
    written = [
        {k.value for k in node.keys if isinstance(k, ast.Constant)}
        for node in ast.walk(tree)
        if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "__key__"
                                              for k in node.keys)]
    assert written == [{"__key__", *layout.SHARD_MEMBERS}]
    assert set(data.SAMPLE_MEMBERS) == set(layout.SHARD_MEMBERS)
    assert data.REQUIRED_MEMBERS == layout.REQUIRED_MEMBERS
