"""Orchestration: plans stages into parts, runs them on Ray, resumes, and records manifests."""

if __name__ != "ovdistill.pipeline":  # one copy of every module (one OvdError class)
    raise ImportError(f"import ovdistill.pipeline, not {__name__} (python -m ovdistill..., "
                      f"pip install -e .)")
