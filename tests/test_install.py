"""What installing the project puts in site-packages: one top-level import name, `ovdistill`
(the repository's folders are its packages), and the `ovdistill` command."""
from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REINSTALL = "the installed ovdistill is stale; reinstall: pip install -e ."


def installed() -> md.Distribution:
    """The installed distribution (not a build's ovdistill.egg-info left in the repository,
    which the repository root on sys.path would find first)."""
    found = [d for d in md.distributions(name="ovdistill")
             if Path(d.locate_file("")).resolve() != REPO]
    assert len(found) == 1, [str(d.locate_file("")) for d in found]
    return found[0]


def test_the_distribution_exposes_only_ovdistill():
    dist = installed()
    assert (dist.read_text("top_level.txt") or "").split() == ["ovdistill"], REINSTALL
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert scripts == {"ovdistill": "ovdistill.cli:main"}, REINSTALL
    site = Path(dist.locate_file(""))
    finders = list(site.glob("__editable___ovdistill_*_finder.py"))
    if finders:  # an editable install: the names its finder maps
        text = finders[0].read_text()
        mapping = text.split("MAPPING", 1)[1].split("\n", 1)[0]
        tops = {k.split(".")[0] for k in __import__("re").findall(r"'([\w.]+)':", mapping)}
        assert tops == {"ovdistill"}, (tops, REINSTALL)


def test_outside_the_repository_only_the_one_name_imports(tmp_path):
    code = ("import ovdistill.trainer.train, ovdistill.stages.pack, ovdistill.cli\n"
            "from ovdistill.pipeline.clip_teacher import CONFIG_DIR\n"
            "assert (CONFIG_DIR / 'ovd-tiny-clip.json').is_file()\n"
            "for bare in ('pipeline', 'stages', 'trainer', 'bench'):\n"
            "    try:\n"
            "        __import__(bare)\n"
            "    except ModuleNotFoundError:\n"
            "        continue\n"
            "    raise SystemExit(f'{bare} imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:] + "\n" + REINSTALL


def test_a_bare_name_is_refused_in_the_source_tree():
    proc = subprocess.run([sys.executable, "-c", "import trainer"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "ImportError: import ovdistill.trainer, not trainer" in proc.stderr


def test_the_source_tree_works_without_an_install(tmp_path):
    """PYTHONPATH=<repo> with the installed (editable) finder taken out: ovdistill/__init__.py
    finds the folders."""
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path\n"
            "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n"
            "assert 'ovdistill' not in sys.modules\n"
            "import ovdistill.pipeline.layout as L, ovdistill.stages.text\n"
            "print(L.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(REPO / "pipeline" / "layout.py")


@pytest.mark.slow
def test_the_wheel_holds_ovdistill_only(tmp_path):
    src = tmp_path / "src"  # what a clone holds for the build: the metadata and the packages
    for f in ("pyproject.toml", "README.md"):
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    for folder in ("ovdistill", "pipeline", "stages", "trainer", "bench", "tests"):
        shutil.copytree(REPO / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("ovdistill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"ovdistill", "ovdistill-0.1.0.dist-info"}
    assert "ovdistill/pipeline/teacher_configs/ovd-tiny-clip.json" in names
    assert "ovdistill/stages/text.py" in names and "ovdistill/cli.py" in names
    assert not [n for n in names if n.startswith("ovdistill/tests")]
