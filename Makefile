# The two set-up commands of the README. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint test-slow test-long test-container image deploy constraints bench clean

# pip -qq: errors only. With -q, pip's warnings (one per missing folder of a pip.conf's file:// index, ~300
# lines on a machine with a local mirror) and the build backend's notices came before the pipeline's first line.
PIP_INSTALL := $(BIN)/pip install -qq

$(STAMP): pyproject.toml
	@echo "creating $(VENV) (pip install, a few minutes the first time; errors are shown)"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP_INSTALL) --upgrade pip
	@# torch first, pinned to the release this project is tested on (CPU or CUDA build both work).
	@$(PIP_INSTALL) torch==2.14.1 torchvision==0.29.1
	@$(PIP_INSTALL) -e '.[dev]'
	@touch $(STAMP)

## The main job on embedded defaults: the BUSI-style CV pipeline on the kfp local runner,
## MLflow on SQLite (./mlflow.db, ./mlruns), the built-in demo dataset, CPU, no network.
run: $(STAMP)
	$(BIN)/m2snet pipeline run --local

## The test suite (opt-in: `make test-slow` for the long real-data runs).
test: $(STAMP)
	$(BIN)/python -m pytest

## The architecture's walls (import-linter contracts in pyproject.toml) and ruff; the suite runs both too.
lint: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check .

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

## The long integration runs (marker `long`), a few minutes; CI runs them after `make test`.
test-long: $(STAMP)
	$(BIN)/python -m pytest -m long

## The images with docker or podman: the component image (docker/Dockerfile) and the MLflow server's
## (docker/tracking.Dockerfile); see docker/build.sh for their settings.
image:
	docker/build.sh
	docker/build.sh tracking

## Apply k8s/ to the current kubectl context (OVERLAY=k8s/overlays/gpu; DRY_RUN=1 prints instead). Refuses,
## naming each Secret and key, while k8s/base/secrets.yaml still holds a CHANGE-ME placeholder.
OVERLAY ?= k8s/overlays/gpu
deploy: $(STAMP)
	$(BIN)/python tools/k8s_apply.py $(if $(DRY_RUN),--dry-run) $(OVERLAY)

## Pin the image's dependencies to this (tested) environment's versions.
constraints: $(STAMP)
	{ sed -n '1,3p' docker/constraints.txt; $(BIN)/pip freeze --exclude-editable \
	  | grep -v -E '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-(bindings|pathfinder|toolkit))=='; } > docker/constraints.tmp
	mv docker/constraints.tmp docker/constraints.txt

## The pipeline with every step in that image (builds it first; podman or docker).
test-container: $(STAMP)
	$(BIN)/python -m pytest -m container

## The quick CPU benches (figures and ratios; the long and GPU ones are in bench/, see docs/benchmarks.md):
## the models' forward speed at 128 px, batch 1, and whether the training loader keeps up with a training
## step on the demo set. About 4 min each on a busy 2-core box.
bench: $(STAMP)
	$(BIN)/python bench/model_speed.py --device cpu --size 128 --batches 1 --repeats 3 --warmup 1 --no-train
	$(BIN)/python bench/data_speed.py --demo 8 --size 64 --workers 0 --repeats 2

clean:
	rm -rf $(VENV) mlflow.db mlruns .m2snet
