# fastmveb: every target sets itself up (make setup is idempotent: seconds when nothing changed).
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.fastmveb-installed
# make beton: no DATA -> embedded synthetic dataset; DATA=/path/to/imagefolder OUT=dir -> train/val betons;
# DATA=folder of images or a list file -> unlabeled (or list-labelled) betons. MODE=imagefolder|folder forces the mode
# that `dataset_prep auto` would otherwise pick from DATA (it names MODE=folder when it cannot tell).
DATA      ?=
MODE      ?=
OUT       ?= $(if $(DATA),data/imagefolder,data/synthetic)
FORCE     ?= 0
BETON_ARGS ?=
# make bench: BENCH=all|loader|views|entropy|step|ramp|train|profile|report ; BENCH_ARGS e.g. --short, --sweep
BENCH     ?= all
BENCH_ARGS ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
PYVER     ?= 3.12

.PHONY: setup beton demo test test-all bench gpu-check wheelhouse clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/system_deps.sh Makefile
	@# system packages ffcv compiles against (pkg-config libopencv-dev libturbojpeg0-dev), via apt-get when missing
	@bash scripts/system_deps.sh
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	@# torch first, as an exact registry pair: ffcv's deps would otherwise pull the newest build,
	@# and the machine-local CPU-only torch wheel does not match registry torchvision (NOTES.md).
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	@$(BIN)/python -c "import torch, torchvision, ffcv, kornia, accelerate; from importlib.metadata import version as v; print('fastmveb env ok:', ', '.join(p + ' ' + v(p) for p in ('torch', 'torchvision', 'ffcv', 'kornia', 'accelerate')))"
	@touch $(STAMP)

beton: setup
	$(BIN)/python -m dataset_prep $(if $(DATA),$(or $(MODE),auto) --data $(DATA),synthetic) --out $(OUT) $(if $(filter 1,$(FORCE)),--force,) $(BETON_ARGS)

# Rewritten when the generator changes (a stale set would silently give other demo figures).
data/synthetic/train.beton: dataset_prep/synthetic.py | setup
	$(BIN)/python -m dataset_prep synthetic --out data/synthetic --force

demo: setup data/synthetic/train.beton
	$(BIN)/python fastmveb/train.py --rc rcs/tiny.yaml

# TEST_WORKERS: pytest-xdist processes (2 = CI's cores; 0 = all in this process). Each worker and what it starts
# uses one thread (tests/conftest.py); whole modules go to one worker, so a module's trained run is made once.
test: setup
	$(BIN)/python -m pytest -q -m "not slow and not gpu" -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

bench: setup data/synthetic/train.beton
	$(BIN)/python -m fastmveb.bench $(BENCH) $(BENCH_ARGS)

# make gpu-check OUT=DIR: every speed figure in one time-boxed command (scripts/gpu_check.sh; OUT empty or --force).
# On an offline GPU host: make gpu-check OUT=DIR WHEELHOUSE=wheelhouse (installs into the host's torch env, no setup;
# install + check within 540 s). Without make: bash scripts/gpu_check.sh --out DIR --wheelhouse wheelhouse.
# GPU_CHECK_ARGS e.g. --device cpu --short (the CPU dry run of the check).
WHEELHOUSE ?=
GPU_CHECK_ARGS ?=
gpu-check: $(if $(WHEELHOUSE),,setup)
	bash scripts/gpu_check.sh --out $(if $(filter command environment,$(origin OUT)),$(OUT),gpu-check) $(if $(WHEELHOUSE),--wheelhouse $(WHEELHOUSE),) $(GPU_CHECK_ARGS)

wheelhouse: setup
	@# OUT is shared with `make beton`: only an OUT given on the command line/env is used here.
	PYVER=$(PYVER) OUT=$(if $(filter command environment,$(origin OUT)),$(OUT),wheelhouse) bash scripts/wheelhouse.sh

clean:
	rm -rf $(VENV) build *.egg-info
