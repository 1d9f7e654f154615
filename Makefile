# steer_lens: set-up, demo, tests, docs and benchmarks. Every target works on a fresh clone.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first, pinned (constraints.txt): an unpinned torch pulls several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
SHARED ?= ../shared
# Use the shared Hugging Face cache (offline) when it is there; elsewhere the hub is used as usual.
HF_ENV := $(if $(wildcard $(SHARED)/models/hub),HF_HUB_CACHE=$(abspath $(SHARED)/models/hub) HF_HUB_OFFLINE=1,) $(if $(wildcard $(SHARED)/data/tinystories),STEER_LENS_DATA=$(abspath $(SHARED)/data/tinystories),)
DATA ?= $(wildcard $(SHARED)/data/tinystories/*.txt)
PYTEST_WORKERS ?= 2
# llama.cpp's Python binding, for the end-to-end export check (tests/test_export_llama_cpp.py). It
# compiles llama.cpp (about 10 CPU-minutes); a wheel in .whl/ (ignored) is used first. A failed build
# only skips that test, with its reason. `make install LLAMA_CPP=` leaves it out.
LLAMA_CPP ?= llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF

.PHONY: install demo test lint docs bench clean gpu-prepare gpu-check-dry

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[all,dev,docs]"
	$(if $(LLAMA_CPP),CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install -q -c constraints.txt $(if $(wildcard .whl/*.whl),--find-links .whl,) "$(LLAMA_CPP)" || echo "make install: $(LLAMA_CPP) did not build; tests/test_export_llama_cpp.py will be skipped",)
	touch $@

demo: install
	$(HF_ENV) $(BIN)/steer-lens demo $(if $(DATA),--texts $(DATA),) --out demo-out

lint: install
	$(BIN)/ruff check steer_lens tests benchmarks

# one thread per pytest worker: two workers on two cores, no oversubscription
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

test: install lint
	$(HF_ENV) $(TEST_ENV) $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) tests
	$(HF_ENV) $(TEST_ENV) $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --nbmake --nbmake-timeout=1500 notebooks

docs: install
	$(BIN)/mkdocs build --strict --site-dir site

bench: install
	$(HF_ENV) $(BIN)/python benchmarks/bench_core.py
	$(HF_ENV) $(BIN)/python benchmarks/bench_rl.py --threads 1
	$(HF_ENV) $(BIN)/python benchmarks/bench_patching.py --threads 1
	$(HF_ENV) $(BIN)/python benchmarks/bench_sae.py --threads 1
	$(HF_ENV) $(BIN)/python benchmarks/bench_lora.py --threads 1

# the GPU check (docs/benchmarks/gpu.md): prepare the carried folders here; dry-run it on the CPU
gpu-prepare:
	benchmarks/gpu_prepare.sh $(SHARED)

gpu-check-dry: install gpu-prepare
	DEVICE=cpu QUICK=1 PY=$(BIN)/python WHEELS=0 OUT=gpu-out bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) site demo-out .pytest_cache gpu-out
