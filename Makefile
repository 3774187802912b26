# Two commands: `make serve` and `make test`. Both create .venv if there is none and install the right set
# (the GPU set where nvidia-smi sees a GPU, else the CPU set); re-running is quick when nothing changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
RUNTIME := $(if $(HAS_GPU),gpu,cpu)
STAMP := $(VENV)/.installed-$(RUNTIME)

.PHONY: install test weights clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(RUNTIME),train,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

weights: install
	$(BIN)/python -m model_zoo.pretrained

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache
