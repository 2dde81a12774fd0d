"""Benchmarks: `python -m ovdistill.bench.<name>`; each module has `main(argv=None)` printing a table."""

if __name__ != "ovdistill.bench":  # one copy of every module (one OvdError class)
    raise ImportError(f"import ovdistill.bench, not {__name__} (python -m ovdistill..., "
                      f"pip install -e .)")
