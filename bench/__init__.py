"""Benchmarks: `python -m bench.<name>`; each module has `main(argv=None)` printing a table."""
