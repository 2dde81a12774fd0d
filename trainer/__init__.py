"""ViLD distillation trainer: streams the cached WebDataset shards."""

if __name__ != "ovdistill.trainer":  # one copy of every module (one OvdError class)
    raise ImportError(f"import ovdistill.trainer, not {__name__} (python -m ovdistill..., "
                      f"pip install -e .)")
