# QuantLab — `make help` lists the targets.
SHELL := /bin/bash
SWIFT ?= swift
PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
QUICK ?=
RELEASE_BIN := .build/release
# An import of a package target that the importing target does not list is a build error, so
# the library's layers (ARCHITECTURE.md) are enforced by the compiler, not by review.
SWIFT_FLAGS := --explicit-target-dependency-import-check error
EXPERIMENTS := $(sort $(notdir $(wildcard experiments/exp*)))

.DEFAULT_GOAL := help
.PHONY: results help build release test check-layers check-class-sizes kill-resume gpu-emulated gpu-bundle fuzz bench-engine bench-torch bench demo smoke crosscheck venv clean info data cuda models

help: ## list the targets
	@echo "QuantLab — INT8 quantization of object detectors, reproduced from scratch"
	@echo
	@grep -hE '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'
	@echo
	@echo "  QUICK=1 makes experiments and the demo small enough for a smoke run (results/quick/)."
	@echo "  QL_NUM_THREADS=n sets kernel threads; QL_ISA=ref|avx2|avx512 caps the SIMD level."

build: ## debug build of the library, the qlab tool and the experiments
	$(SWIFT) build $(SWIFT_FLAGS)

release: ## optimised build (used by bench, demo and experiments)
	$(SWIFT) build -c release $(SWIFT_FLAGS)

test: ## run the test suites (kernels vs references, gradients vs finite differences, ...)
	$(SWIFT) test $(SWIFT_FLAGS)

check-layers: ## every import is a declared dependency (C modules included) and the library targets form a stack
	$(PYTHON) scripts/check_layers.py --self-test

check-class-sizes: release ## no Swift class is allocated with two sizes in the release binaries (a Swift 6.3 cross-module-optimisation bug dropped private stored properties: scripts/check_class_sizes.py)
	$(PYTHON) scripts/check_class_sizes.py $$(find $(RELEASE_BIN)/ -maxdepth 1 -type f -perm -u+x \( -name qlab -o -name 'exp*' \))

kill-resume: release ## SIGKILL qlab train at random moments, resume each time: the final weights must equal an uninterrupted run's
	@[ -d data/shapes-tiny ] || $(RELEASE_BIN)/qlab make-data --preset shapes-tiny --root data
	scripts/kill_resume.sh 20

demo: release ## train a small conv net on the built-in toy task (QUICK=1: fewer steps)
	$(RELEASE_BIN)/qlab demo $(if $(QUICK),--steps 60,)

info: release ## CPU features, kernel ISA and threads this machine will use
	$(RELEASE_BIN)/qlab info

bench: release ## kernel benchmarks as ratios measured in one run (SGEMM vs numpy/OpenBLAS, INT8 vs FP32, conv vs GEMM)
	$(RELEASE_BIN)/qlab bench $(if $(QUICK),--quick,) --python "$$( [ -x $(VENV_PY) ] && echo $(VENV_PY) || echo $(PYTHON) )"

bench-engine: release ## the engine on the full-size detector: FP32 graph vs INT8 plan at batch 1 and 32, and onnxruntime on the same model (make venv), as ratios in one run
	$(RELEASE_BIN)/qlab bench --engine $(if $(QUICK),--quick,)

TORCH_VENV := .venv-torch
$(TORCH_VENV)/bin/python:
	$(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TORCH_VENV)/bin/python -m pip install --quiet torch safetensors numpy

bench-torch: release $(TORCH_VENV)/bin/python ## detector training step and inference, ours vs PyTorch on the same model, weights, batch and threads, in one run (makes .venv-torch: PyTorch from PyPI, ~5 GB, a few minutes; never in CI)
	@mkdir -p results/bench-torch
	$(RELEASE_BIN)/qlab bench --torch --torch-python $(TORCH_VENV)/bin/python $(if $(QUICK),--quick,) \
	  --json results/bench-torch/$$($(RELEASE_BIN)/qlab info | sed -n 's/^kernels: \([a-z0-9]*\).*/\1/p')$(if $(QUICK),-quick,).json

smoke: release ## every experiment with QUICK=1 (results go to results/quick/)
	@if [ -z "$(EXPERIMENTS)" ]; then \
	  echo "no experiments yet: smoke runs the demo"; $(RELEASE_BIN)/qlab demo --steps 60; \
	else for e in $(EXPERIMENTS); do echo "== $$e (quick)"; $(RELEASE_BIN)/$$e --quick || exit 1; done; fi

data: release ## generate the default synthetic datasets in data/ (detection 'shapes', classification 'shapes-cls')
	$(RELEASE_BIN)/qlab make-data --preset $(if $(QUICK),shapes-tiny,shapes) --root data
	$(if $(QUICK),,$(RELEASE_BIN)/qlab make-data --preset shapes-cls --root data)

models: release ## train and cache the FP32 baselines in data/models/ (detectors x {repvgg, qarepvgg, repopt}, classifiers x {repvgg, qarepvgg, repopt})
	$(RELEASE_BIN)/qlab models $(if $(QUICK),--quick,)

exp%: release ## run experiment expNN (e.g. make exp02, the main job; QUICK=1 for a smoke run into results/quick/)
	@e=$$(ls -d experiments/$@_* 2>/dev/null | head -1); \
	if [ -z "$$e" ]; then echo "no experiment $@ in experiments/"; exit 2; fi; \
	$(RELEASE_BIN)/$$(basename $$e) $(if $(QUICK),--quick,)

results: release ## regenerate results/exp08.md and README.md's results index from results/*.json (seconds; no model needed; QUICK=1: results/quick/)
	$(RELEASE_BIN)/exp08_summary --tables-only $(if $(QUICK),--quick,)

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --quiet --upgrade pip

venv: $(VENV_PY) ## project-local Python (git-ignored) with the reference packages used by crosscheck, bench, the ONNX tests (onnxruntime) and exp06 (OpenCV)
	$(VENV_PY) -m pip install --quiet numpy safetensors pycocotools onnx onnxruntime opencv-python-headless

crosscheck: venv release ## compare with the reference implementations: pycocotools (all 12 numbers), calibrators (numpy), Python safetensors
	$(VENV_PY) scripts/crosscheck_coco.py $(RELEASE_BIN)/qlab
	$(VENV_PY) scripts/crosscheck_calibrators.py $(RELEASE_BIN)/qlab
	$(SWIFT) test --filter SafeTensorsTests

cuda: ## build the CUDA plugin .build/cuda/libqlcuda.so (installs nvcc into .venv-cuda if needed); no GPU needed to build
	scripts/build_cuda.sh

fuzz: ## libFuzzer on the readers of outside input (COCO JSON, detections, safetensors, JPEG, model files), 60 s each; FUZZ_SECONDS to change
	scripts/fuzz.sh --self-test
	scripts/fuzz.sh $(or $(FUZZ_SECONDS),60)

# tests that use only the entries cuda/check/host_plugin.cpp emulates
GPU_EMULATED_TESTS := engineActivations|int8PlanOnDevice|attentionPlanOnDevice|deviceMemoryReuse|tensorDispatch
HOST_PLUGIN := .build/cuda/host-check/libqlcuda-host.so
$(HOST_PLUGIN):
	scripts/build_cuda.sh
gpu-emulated: $(HOST_PLUGIN) ## the GPU engine's Swift side (CUDAPlan, CUDAOps) against the plugin's ABI emulated on the CPU (no GPU needed; make cuda builds it)
	QL_CUDA_PLUGIN=$(CURDIR)/$(HOST_PLUGIN) $(SWIFT) test $(SWIFT_FLAGS) --filter "$(GPU_EMULATED_TESTS)"

gpu-bundle: cuda ## pack the tests, qlab, the plugin and the Swift runtime into .build/gpu-bundle.tar.xz for a CUDA machine without Swift
	scripts/gpu_bundle.sh

clean: ## remove build outputs (keeps data/ and results/)
	rm -rf .build
