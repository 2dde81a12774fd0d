"""One module per stage; each follows the stage protocol documented in pipeline/runner.py."""

if __name__ != "ovdistill.stages":  # one copy of every module (one OvdError class)
    raise ImportError(f"import ovdistill.stages, not {__name__} (python -m ovdistill..., "
                      f"pip install -e .)")
