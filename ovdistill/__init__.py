"""ovdistill: the one import name of this project. Its packages are the repository's folders:

    ovdistill.pipeline -> pipeline/   (the library floor and the stage runner)
    ovdistill.stages   -> stages/
    ovdistill.trainer  -> trainer/
    ovdistill.bench    -> bench/
    ovdistill.cli, ovdistill.query     (here: `ovdistill run | status | query`)

An install maps them (pyproject.toml `package-dir`); a source tree used without an install
(PYTHONPATH=<repo>, `python -m ovdistill...` from the repository root) finds them through the
fallback below, so the folders stay where the design puts them.
"""
from pathlib import Path as _Path

_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "pipeline" / "__init__.py").is_file():
    __path__.append(str(_root))  # a source tree: ovdistill.pipeline = <root>/pipeline
