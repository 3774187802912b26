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

.PHONY: serve test install weights browser postgres compose bench ship model-figures clean

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
FIGURES ?= bench/results
EVAL_SETS := --data-root $(DATA)/cuhk03-detected --data-root $(DATA)/prid --data-root $(DATA)/grid
bench: $(VENV)/.test-$(RUNTIME)
	mkdir -p $(BENCH_WORK)
	$(BIN)/python bench/service_bench.py --output bench/results/service.json
	$(MAKE) model-figures
	$(BIN)/python bench/embed_speed.py $(DEFAULT_MODEL).onnx $(DEFAULT_MODEL).int8.onnx --threads 1 2 --rounds 5 --seconds 5 --output bench/results/embed_speed_int8.json
	$(BIN)/python bench/heatmap_cost.py --data $(DATA) --output bench/results/heatmap_cost.json
	$(BIN)/python bench/gallery_scale.py --data $(DATA) --work $(BENCH_WORK)/scale --output bench/results/gallery_1m.json
	$(BIN)/python bench/gallery_scale.py --data $(DATA) --work $(BENCH_WORK)/scale --server-only --precision int8 \
		--settings '[{"kind": "ivf", "reduce_dim": 128, "nlist": 1024, "nprobe": [64], "candidates": [50]}]' --output bench/results/gallery_1m_served_int8_pca128_nprobe64.json

# Make a finished training run the shipped default, every file and figure the model card cites: the ONNX
# file (the exporter's parity check), its same-person threshold calibrated on CUHK03-val, its int8 (CPU) and
# fp16 (GPU) files, each file's accuracy on the three validation sets, and its CPU speed against the previous
# default (`make bench` adds int8's). RUN: the run folder (its model.pt); FIGURES: where the figures go.
# About 30 minutes on 2 cores; then update the model card and the README with the figures.
TRAIN_SETS := --data-root $(DATA)/cuhk03-detected --data-root $(DATA)/peta-train --data-root $(DATA)/conreid-train
ship: $(VENV)/.test-$(RUNTIME)
	test -f "$(RUN)/model.pt" || { echo "RUN=<run folder with model.pt>"; exit 2; }
	$(BIN)/python -m training export $(RUN)/model.pt $(DEFAULT_MODEL).onnx
	$(BIN)/python -m training calibrate $(DEFAULT_MODEL).onnx $(EVAL_SETS)
	$(BIN)/python -m training quantize $(DEFAULT_MODEL).onnx $(TRAIN_SETS)
	$(BIN)/python -m training fp16 $(DEFAULT_MODEL).onnx $(TRAIN_SETS)
	$(MAKE) model-figures
	$(BIN)/python bench/embed_speed.py model_zoo/models/cama_mobilenetv2_cuhk03.onnx $(DEFAULT_MODEL).onnx \
		--threads 1 2 --rounds 4 --seconds 4 --output $(FIGURES)/embed_speed.json

# The shipped default's files on the three validation sets: fp32, int8, fp16.
model-figures: $(VENV)/.test-$(RUNTIME)
	$(BIN)/python -m training evaluate $(DEFAULT_MODEL).onnx $(EVAL_SETS) --quiet --output $(FIGURES)/accuracy_fp32.json
	$(BIN)/python -m training evaluate $(DEFAULT_MODEL).int8.onnx $(EVAL_SETS) --quiet --output $(FIGURES)/accuracy_int8.json
	$(BIN)/python -m training evaluate $(DEFAULT_MODEL).fp16.onnx $(EVAL_SETS) --quiet --output $(FIGURES)/accuracy_fp16.json

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
