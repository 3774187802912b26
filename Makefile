# The two commands: `make serve` (the service on the shipped model, SQLite store in var/) and `make test`.
# Each creates .venv if there is none and installs what it needs: the GPU set where nvidia-smi sees a GPU,
# else the CPU set (never both: the other set's packages are removed first). Re-running is quick: a stamp
# per set is redone only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
RUNTIME := $(if $(HAS_GPU),gpu,cpu)
OTHER_RUNTIME_PACKAGES := $(if $(HAS_GPU),onnxruntime faiss-cpu,onnxruntime-gpu faiss-gpu-cu12)
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: serve test install weights browser clean

serve: $(VENV)/.serve-$(RUNTIME)
	$(BIN)/python -m service

test: $(VENV)/.test-$(RUNTIME)
	$(BIN)/python -m pytest

install: $(VENV)/.test-$(RUNTIME)

weights: $(VENV)/.test-$(RUNTIME)
	$(BIN)/python -m model_zoo.pretrained

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"

$(VENV)/.serve-$(RUNTIME): pyproject.toml | $(BIN)/python
	-$(PIP) uninstall --quiet --yes $(OTHER_RUNTIME_PACKAGES) 2>/dev/null
	$(PIP) install --quiet -e ".[$(RUNTIME)]"
	rm -f $(VENV)/.serve-* $(VENV)/.test-*
	touch $@

$(VENV)/.test-$(RUNTIME): pyproject.toml $(VENV)/.serve-$(RUNTIME)
	$(PIP) install --quiet -e ".[$(RUNTIME),train,dev]"
	touch $@

# Debian's Chromium and ChromeDriver for the web page's browser test (which skips, saying so, without them).
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver; }

clean:
	rm -rf $(VENV) .pytest_cache
