"""The layering of issue 15, checked on the source: the library floor (pipeline/) imports no
stage, trainer, bench or test module; the trainer imports no stage module and spells no cache
folder or file name (it reads the cache through pipeline/layout.py); bench imports no tests;
and a training run pointed at prebuilt shards needs no stage code at all."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from ovdistill.pipeline import layout

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("pipeline", "stages", "trainer", "bench")  # ovdistill.<these>
CACHE_FILES = (layout.MANIFEST_FILE, layout.PLAN_FILE, layout.RPN_CHECKPOINT,
               layout.REGION_MEAN_FILE, layout.NEGATIVES_FILE, layout.TRAIN_FULL,
               layout.SIZES_FILE, layout.INDEX_FILE, layout.IDS_FILE, layout.CAPTIONS_CSV,
               "train-", "part-")
PATH_CALLS = {"stage_dir", "manifest_path", "read_manifest", "parts", "glob", "rglob",
              "joinpath", "upstream", "fingerprint"}


def sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).glob("*.py"))


def imported(path: Path, *, raw: bool = False) -> list[str]:
    """Every module an `import` / `from ... import` of `path` names, function-level ones too
    (`from pkg import mod` counts as pkg.mod), with the `ovdistill.` prefix removed unless
    `raw` (so `ovdistill.stages.text` reads `stages.text`, `ovdistill.cli` reads `cli`)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out if raw else [m.removeprefix("ovdistill.") for m in out]


def docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value,
                                                                      ast.Constant):
                ids.add(id(body[0].value))
    return ids


def cache_spellings(path: Path) -> list[str]:
    """The cache names `path` spells itself: a file name in a string that is not a docstring,
    or a stage folder as a string where a path is made (`/`, stage_dir(), glob(), ...)."""
    tree = ast.parse(path.read_text())
    skip = docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            found += [f"{node.lineno}: {node.value!r}" for name in CACHE_FILES
                      if name in node.value]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            found += [f"{node.lineno}: / {side.value!r}" for side in (node.left, node.right)
                      if isinstance(side, ast.Constant) and side.value in layout.STAGE_FOLDERS]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in PATH_CALLS):
            found += [f"{node.lineno}: {node.func.attr}({a.value!r})" for a in node.args
                      if isinstance(a, ast.Constant) and a.value in layout.STAGE_FOLDERS]
    return found


def test_the_floor_imports_nothing_above_it():
    above = ("stages", "trainer", "bench", "tests", "cli", "query")
    for path in sources("pipeline"):
        rel = str(path.relative_to(REPO))
        bad = [m for m in imported(path) if m.split(".")[0] in above]
        assert not bad, f"{rel} imports {bad}"
        strings = [n.value for n in ast.walk(ast.parse(path.read_text()))
                   if isinstance(n, ast.Constant) and isinstance(n.value, str)
                   and n.value.removeprefix("ovdistill.").startswith(
                       ("stages.", "trainer.", "bench."))]
        assert not strings, f"{rel} names modules above the floor: {strings}"


def test_every_import_of_the_project_is_by_the_one_name():
    """No `import pipeline` / `from trainer.x import ...` anywhere: the bare names would load
    a second copy of a module (two OvdError classes) where the repository root is on
    sys.path."""
    for folder in (*PROJECT, "tests", "ovdistill"):
        for path in sources(folder):
            bare = [m for m in imported(path, raw=True) if m.split(".")[0] in PROJECT]
            assert not bare, f"{path.relative_to(REPO)} imports {bare}"


def test_the_trainer_imports_no_stage_and_spells_no_cache_name():
    for path in sources("trainer"):
        rel = str(path.relative_to(REPO))
        bad = [m for m in imported(path) if m.split(".")[0] == "stages"
               or m.startswith("pipeline.runner")]
        assert not bad, f"{rel} imports {bad}"
        assert not cache_spellings(path), f"{rel} spells cache names: {cache_spellings(path)}"


def test_query_reads_the_cache_through_the_layout():
    path = REPO / "ovdistill" / "query.py"
    assert not [m for m in imported(path) if m.split(".")[0] == "stages"]
    assert not cache_spellings(path), cache_spellings(path)


def test_bench_imports_no_tests():
    for path in sources("bench"):
        bad = [m for m in imported(path) if m.split(".")[0] == "tests"]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_the_checker_sees_what_it_looks_for(tmp_path):
    """cache_spellings is not blind: a planted file shows each kind."""
    planted = tmp_path / "planted.py"
    planted.write_text(textwrap.dedent('''
        """A docstring may name _MANIFEST.json."""
        a = cache / "wds" / "_MANIFEST.json"
        b = ctx.stage_dir("regions").glob("part-*.parquet")
        c = cache.read_manifest(TEXT)
    '''))
    found = cache_spellings(planted)
    assert len(found) == 4 and "c =" not in " ".join(found), found


NO_STAGES = textwrap.dedent("""
    import sys
    sys.modules["ovdistill.stages"] = None  # any `import ovdistill.stages...` now fails
    from ovdistill.bench.wds_fixture import TINY_SETTINGS, write_tiny_cache
    from ovdistill.trainer.evaluate import main as evaluate_main
    from ovdistill.trainer.train import main as train_main
    tiny = write_tiny_cache(sys.argv[1])
    sets = [a for k, v in TINY_SETTINGS.items() for a in ("--set", f"{k}={v!r}")]
    common = ["--manifest", str(tiny.manifest), "--cache", str(tiny.cache), "--device", "cpu"]
    assert train_main([*common, "--out", sys.argv[2], "--steps", "2", *sets]) == 0
    assert evaluate_main([*common, "--run", sys.argv[2]]) == 0
    assert not [m for m in sys.modules if m.startswith("ovdistill.stages")
                if sys.modules[m] is not None]
""")


def test_a_run_on_prebuilt_shards_needs_no_stage_code(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", NO_STAGES, str(tmp_path / "tiny"),
                           str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "latest.pt").is_file()
