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

.PHONY: setup beton demo test test-all test-torch bench gpu-check wheelhouse clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/system_deps.sh Makefile
	@# system packages ffcv compiles against (pkg-config libopencv-dev libturbojpeg0-dev), via apt-get when missing
	@bash scripts/system_deps.sh
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	@# torch first, as an exact registry pair: ffcv's deps would otherwise pull the newest build,
	@# and the machine-local CPU-only torch wheel does not match registry torchvision (docs/notes.md).
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

# make test-torch TORCH=2.11.0: the fast suite under another supported torch, in its own .venv-torch$(TORCH) (built
# once, with Python $(PYVER): pyenv's when it has one, as on the GPU host) holding that torch with its torchvision.
# The other packages keep constraints.txt's pins, except those that come with the pinned torch's own build (triton,
# nvidia-*, cuda-*): pip picks the ones this torch asks for.
TORCH     ?=
TORCH_PAIRS := 2.11.0:0.26.0 2.12.0:0.27.0 2.12.1:0.27.1 2.13.0:0.28.0 2.14.0:0.29.0 2.14.1:0.29.1
TORCHVISION = $(patsubst $(TORCH):%,%,$(filter $(TORCH):%,$(TORCH_PAIRS)))
TORCH_VENV = .venv-torch$(TORCH)
TORCH_PY  ?= $(or $(lastword $(wildcard $(or $(shell pyenv root 2>/dev/null),$(HOME)/.pyenv)/versions/$(PYVER).*/bin/python$(PYVER))),$(shell command -v python$(PYVER)))
test-torch:
	@$(if $(and $(TORCH),$(TORCHVISION)),,echo "error: TORCH='$(TORCH)' is not a supported torch; give one of $(foreach p,$(TORCH_PAIRS),$(firstword $(subst :, ,$(p)))) (e.g. make test-torch TORCH=2.11.0)" >&2; exit 2)
	@$(if $(TORCH_PY),,echo "error: no Python $(PYVER) found (pyenv or python$(PYVER) on PATH); install it or give PYVER=3.x / TORCH_PY=/path/to/python" >&2; exit 2)
	@test ! -x $(TORCH_VENV)/bin/python || $(TORCH_VENV)/bin/python -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$(PYVER)'.split('.'))))" || { echo "error: $(TORCH_VENV) was built with another Python than PYVER=$(PYVER); give its PYVER or remove it (rm -r $(TORCH_VENV))" >&2; exit 2; }
	@$(MAKE) --no-print-directory $(TORCH_VENV)/.fastmveb-installed TORCH=$(TORCH)
	$(TORCH_VENV)/bin/python -m pytest -q -m "not slow and not gpu" -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

.venv-torch%/.fastmveb-installed: pyproject.toml constraints.txt scripts/system_deps.sh Makefile
	@bash scripts/system_deps.sh
	@test -x $(TORCH_VENV)/bin/python || $(TORCH_PY) -m venv $(TORCH_VENV)
	@# pip only: setuptools is what this torch asks for (torch 2.11 wants setuptools<82)
	@$(TORCH_VENV)/bin/python -m pip install -q --upgrade pip
	@grep -Ev '^(torch|torchvision|triton|nvidia-|cuda-)' constraints.txt > $(TORCH_VENV)/constraints.txt
	@# '===': exactly the registry build, never a local variant such as 2.13.0+cpu (registry torchvision fails on it).
	$(TORCH_VENV)/bin/python -m pip install -q -c $(TORCH_VENV)/constraints.txt torch===$(TORCH) torchvision===$(TORCHVISION)
	$(TORCH_VENV)/bin/python -m pip install -q -c $(TORCH_VENV)/constraints.txt -e '.[test]'
	@$(TORCH_VENV)/bin/python -c "import torch, torchvision, ffcv, kornia, accelerate; assert torch.__version__.split('+')[0] == '$(TORCH)', torch.__version__; import sys; print('$(TORCH_VENV) ok: Python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
	@touch $@

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
	rm -rf $(VENV) .venv-torch* build *.egg-info
