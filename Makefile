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

.PHONY: serve test install weights browser postgres compose bench clean

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
	$(PIP) install --quiet -e ".[$(RUNTIME),train,dev,cluster]"
	touch $@

# Every performance figure the README shows, written into bench/results/ with the machine described: the
# service (enrol throughput against the raw model, query latency), int8 against fp32 (accuracy on the three
# validation sets, speed side by side), a million-item gallery. Hours on 2 cores, not a test. DATA: the data
# folder (training sets, cuhk03-detected, prid, grid); BENCH_WORK: room for a 16 GB gallery store.
DATA ?= ../shared/data
BENCH_WORK ?= /tmp/reid-bench
DEFAULT_MODEL := model_zoo/models/cama_mobilenetv2_pool
EVAL_SETS := --data-root $(DATA)/cuhk03-detected --data-root $(DATA)/prid --data-root $(DATA)/grid
bench: $(VENV)/.test-$(RUNTIME)
	mkdir -p $(BENCH_WORK)
	$(BIN)/python bench/service_bench.py --output bench/results/service.json
	$(BIN)/python -m training evaluate $(DEFAULT_MODEL).onnx $(EVAL_SETS) --quiet --output bench/results/accuracy_fp32.json
	$(BIN)/python -m training evaluate $(DEFAULT_MODEL).int8.onnx $(EVAL_SETS) --quiet --output bench/results/accuracy_int8.json
	$(BIN)/python bench/embed_speed.py $(DEFAULT_MODEL).onnx $(DEFAULT_MODEL).int8.onnx --threads 1 2 --rounds 5 --seconds 5 --output bench/results/embed_speed_int8.json
	$(BIN)/python bench/heatmap_cost.py --data $(DATA) --output bench/results/heatmap_cost.json
	$(BIN)/python bench/gallery_scale.py --data $(DATA) --work $(BENCH_WORK)/scale --output bench/results/gallery_1m.json
	$(BIN)/python bench/gallery_scale.py --data $(DATA) --work $(BENCH_WORK)/scale --server-only --precision int8 \
		--settings '[{"kind": "ivf", "reduce_dim": 128, "nlist": 1024, "nprobe": [64], "candidates": [50]}]' --output bench/results/gallery_1m_served_int8_pca128_nprobe64.json

# Debian's Chromium and ChromeDriver for the web page's browser test (which skips, saying so, without them).
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver; }

# Debian's PostgreSQL server for the cluster backend's tests (which skip, saying so, without it); the tests
# start their own server in a temporary folder, so the package's own cluster is never used.
postgres:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
		{ apt-get update -q && apt-get install -y -q --no-install-recommends postgresql; }

# Debian's docker-compose, for the test that validates every profile of docker-compose.yml (skipped without it).
compose:
	command -v docker-compose >/dev/null || { apt-get update -q && apt-get install -y -q --no-install-recommends docker-compose; }

clean:
	rm -rf $(VENV) .pytest_cache
