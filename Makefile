# The two commands of the contract: `make stages` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MANIFEST ?= data_manifests/toy.yaml
CACHE ?= cache
RUN ?= runs/toy
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup stages test status train eval ablation bench query clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

stages: setup
	$(PY) -m pipeline run --manifest $(MANIFEST) --cache $(CACHE)

status: setup
	$(PY) -m pipeline status --cache $(CACHE)

test: setup
	$(PY) -m pytest -q tests

train: setup
	$(PY) -m trainer.train --manifest $(MANIFEST) --cache $(CACHE) --out $(RUN)

eval: setup
	$(PY) -m trainer.evaluate --manifest $(MANIFEST) --cache $(CACHE) --run $(RUN)

# text, image, vild and ensemble with the same steps and seed: the paper's central table
ablation: setup
	$(PY) -m trainer.ablation --manifest $(MANIFEST) --cache $(CACHE) --out runs/ablation

bench: setup
	$(PY) -m bench.run_all --manifest $(MANIFEST) --cache $(CACHE)

query: setup
	$(PY) -m pipeline query "a photo of a star" --cache $(CACHE) --k 24 --out results.png

clean:
	rm -rf $(CACHE) $(RUN)
