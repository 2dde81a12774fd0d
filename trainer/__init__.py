"""ViLD distillation trainer: streams the cached WebDataset shards."""
