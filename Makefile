# The two commands of the contract: `make stages` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MANIFEST ?= data_manifests/toy.yaml
CACHE ?= cache
RUN ?= runs/toy
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup stages test status train eval ablation bench query mutate clean gpu-wheels toy-teacher

# torchvision's compiled ops (nms, roi_align) need the registry's CUDA build of torch, about 7 GB
# installed and more while pip unpacks it: say so in one line rather than fail half-way with ENOSPC.
MIN_FREE_GB ?= 12

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c "import shutil,sys; f=shutil.disk_usage('.').free/2**30; sys.exit(0 if f>=$(MIN_FREE_GB) else 'setup needs $(MIN_FREE_GB) GB free for .venv (torch with its CUDA libraries); %.1f GB free in %s' % (f, '$(CURDIR)'))"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

stages: setup
	$(PY) -m ovdistill run --manifest $(MANIFEST) --cache $(CACHE)

# The embedded default's teacher is a committed release file (TEACHER_FILE, float16): `make
# stages` loads it rather than training one (~15 min of the stages on 2 cores). `make
# toy-teacher` trains it again with open_clip_train, the manifest's teacher settings, into
# build/toy-teacher (~20 min) and compares the export with the committed file byte for byte
# (exit 1 if it differs: the training is deterministic per CPU kind, BENCHMARKS lab log 64).
TEACHER_FILE ?= data_manifests/toy_teacher/ovd-tiny-clip.pt
toy-teacher: setup
	$(PY) -m ovdistill run --manifest $(MANIFEST) --cache build/toy-teacher --stages dataset,teacher \
		--set teacher.pretrained=null
	$(PY) -m ovdistill release-teacher --manifest $(MANIFEST) --cache build/toy-teacher \
		--out build/toy-teacher/$(notdir $(TEACHER_FILE)) --compare $(TEACHER_FILE)

status: setup
	$(PY) -m ovdistill status --cache $(CACHE)

test: setup
	$(PY) -m pytest -q tests

# The best row of `make ablation` (ensemble_residual): ViLD with a text head and an image head,
# the image head distilled on centred targets with the contrastive term beside the L1, scored
# with ViLD-ensemble, the manifest's 1,000 steps (~12 min on 2 cores alone). TRAIN_FLAGS="--mode
# vild" EVAL_FLAGS= gives the paper's shared-head ViLD.
TRAIN_FLAGS ?= --mode vild --heads separate --set center_targets=true --set contrastive_weight=1.0
EVAL_FLAGS ?= --ensemble

train: setup
	$(PY) -m ovdistill.trainer.train --manifest $(MANIFEST) --cache $(CACHE) --out $(RUN) $(TRAIN_FLAGS)

# --pictures: also <run>/val_detections*.png (GT | predictions) and val_pr*.png (PR curves)
eval: setup
	$(PY) -m ovdistill.trainer.evaluate --manifest $(MANIFEST) --cache $(CACHE) --run $(RUN) $(EVAL_FLAGS) \
		--pictures

# text, image, vild, ensemble and the remedies' rows, same steps and seed (ROWS=text,vild: a
# subset; empty: all; ensemble+pairs_frozen trains its pair iterations on top of the steps).
# Finished rows are skipped; the summary holds every finished row.
ROWS ?=
ablation: setup
	$(PY) -m ovdistill.trainer.ablation --manifest $(MANIFEST) --cache $(CACHE) --out runs/ablation \
		--rows "$(ROWS)"

bench: setup
	$(PY) -m ovdistill.bench.run_all --manifest $(MANIFEST) --cache $(CACHE)

# Mutation testing ([tool.mutmut] in pyproject.toml: crops, boxes, losses, data, runner, regions),
# on demand and never in CI. mutmut names modules by their paths, so it runs in build/mutate/,
# staged here in the installed layout (ovdistill/pipeline/..., re-copied each time; mutmut's
# results stay in build/mutate/mutants/, so a run resumes). MUTATE="ovdistill.trainer.losses*"
# restricts it to matching mutants; the survivors are listed at the end (BENCHMARKS.md has the
# last run's). OMP_NUM_THREADS=1: mutmut forks each mutant's test run from a process whose
# torch already started OpenMP threads, and a forked child's first parallel op then hangs.
MUTATE ?=
MUTATE_DIR := build/mutate
mutate: setup
	$(PY) -m pip install -q "mutmut>=3.2,<4"
	mkdir -p $(MUTATE_DIR)/ovdistill
	rm -rf $(MUTATE_DIR)/ovdistill/* $(MUTATE_DIR)/tests $(MUTATE_DIR)/data_manifests
	cp ovdistill/*.py $(MUTATE_DIR)/ovdistill/
	cp -r pipeline stages trainer bench $(MUTATE_DIR)/ovdistill/
	cp -r tests data_manifests pyproject.toml $(MUTATE_DIR)/
	cd $(MUTATE_DIR) && OMP_NUM_THREADS=1 $(CURDIR)/$(VENV)/bin/mutmut run --max-children 2 $(MUTATE)
	cd $(MUTATE_DIR) && $(CURDIR)/$(VENV)/bin/mutmut results

query: setup
	$(PY) -m ovdistill query "a photo of a red star" --cache $(CACHE) --k 24 --out results.png

# The wheels a lent GPU machine lacks (it has torch, torchvision, pyarrow, ... and no registry),
# downloaded here for its Python into wheels/ (ignored; it travels with the working tree, <= 64
# MiB). Ray is left out (too large): bench/gpu_smoke.sh uses --distributor local. GPU_PYTHON is
# that machine's `python3 -c 'import sys; print(*sys.version_info[:2], sep=".")'` (3.12 there).
GPU_PYTHON ?= 3.12
GPU_WHEELS ?= wheels
WHEELS_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(WHEELS_PY) -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
		--python-version $(GPU_PYTHON) --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d $(GPU_WHEELS) \
		$$($(WHEELS_PY) bench/gpu_wheels.py --pins)
	$(WHEELS_PY) bench/gpu_wheels.py --sizes $(GPU_WHEELS)

clean:
	rm -rf $(CACHE) $(RUN)
