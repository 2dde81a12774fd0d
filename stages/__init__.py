"""One module per stage; each follows the stage protocol documented in pipeline/runner.py."""
