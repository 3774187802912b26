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

.PHONY: serve test lint docs install weights browser postgres compose bench ship import-omz import-default candidates model-figures clean

serve: $(VENV)/.serve-$(RUNTIME)
	$(BIN)/python -m service

test: $(VENV)/.test-$(RUNTIME)
	$(BIN)/python -m pytest

install: $(VENV)/.test-$(RUNTIME)

# ruff (pyproject.toml): the lint rules, and code formatted as `ruff format` writes it (lines at most 120).
lint: $(VENV)/.test-$(RUNTIME)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The documentation site (mkdocs.yml) in build/site; --strict fails on any warning, a broken link among them.
docs: $(VENV)/.test-$(RUNTIME)
	$(BIN)/mkdocs build --strict --quiet

weights: $(VENV)/.test-$(RUNTIME)
	$(BIN)/python -m model_zoo.pretrained

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"

$(VENV)/.serve-$(RUNTIME): pyproject.toml | $(BIN)/python
	-$(PIP) uninstall --quiet --yes $(OTHER_RUNTIME_PACKAGES) 2>/dev/null
	$(PIP) install --quiet -e ".[$(RUNTIME),client]"
	rm -f $(VENV)/.serve-* $(VENV)/.test-*
	touch $@

$(VENV)/.test-$(RUNTIME): pyproject.toml $(VENV)/.serve-$(RUNTIME)
	$(PIP) install --quiet -e ".[$(RUNTIME),train,dev,cluster]"
	touch $@

# The default model's performance figures, written into bench/results/ with where they came from (commit,
# command, machine): the service (enrol throughput against the raw model, query latency, heatmap cost, hostile
# requests), every model candidate (accuracy on the three validation sets, CPU speed side by side) and the
# index on the real crops; docs/results.md ("The service with the default model") and docs/models.md print
# them. About two hours on 2 cores, not a test. The million-item gallery and the cluster have their own
# commands (docs/results.md, docs/deployment.md). DATA: the data folder (training sets, cuhk03-detected, prid,
# grid); BENCH_WORK: scratch room for the index benchmark.
DATA ?= ../shared/data
BENCH_WORK ?= /tmp/reid-bench
DEFAULT_MODEL := model_zoo/models/person_reidentification_retail_0277_0286_0287
FIGURES ?= bench/results
EVAL_SETS := --data-root $(DATA)/cuhk03-detected --data-root $(DATA)/prid --data-root $(DATA)/grid
REAL_GALLERY_SETTINGS := [{"kind": "auto"}, {"kind": "ivf", "nlist": 1024, "nprobe": [8, 16, 32, 64, 128]}, \
	{"kind": "hnsw", "m": 32, "ef_search": [64, 128, 256]}]
bench: $(VENV)/.test-$(RUNTIME)
	mkdir -p $(BENCH_WORK)
	$(BIN)/python -m bench.service_bench --galleries --rounds 4 --output bench/results/service_enrol_ensemble.json
	$(BIN)/python -m bench.service_bench --rounds 0 --galleries 1000 10000 --queries 100 \
		--output bench/results/service_query_ensemble.json
	$(BIN)/python -m bench.heatmap_cost --data $(DATA) --rounds 10 --gallery 200 --queries 10 \
		--output bench/results/heatmap_cost_ensemble.json
	$(BIN)/python -m bench.hostile_costs --output bench/results/hostile_costs.json
	$(MAKE) candidates
	$(BIN)/python -m bench.gallery_scale --data $(DATA) --work $(BENCH_WORK)/scale --real-gallery --size 0 --no-server \
		--settings '$(REAL_GALLERY_SETTINGS)' --output bench/results/gallery_real_ensemble.json

# Make a finished training run a shipped model, every file and figure its card cites: the ONNX file (the
# exporter's parity check), its same-person threshold calibrated on CUHK03-val, its int8 (CPU) and fp16 (GPU)
# files, each file's accuracy on the three validation sets. RUN: the run folder (its model.pt); NAME: the file's
# name in model_zoo/models; FIGURES: where the figures go. About 30 minutes on 2 cores; then compare it with
# the default in bench/model_candidates.py and, if it wins, point model_zoo.DEFAULT_MODEL_PATH at it.
TRAIN_SETS := --data-root $(DATA)/cuhk03-detected --data-root $(DATA)/peta-train --data-root $(DATA)/conreid-train
ship: $(VENV)/.test-$(RUNTIME)
	test -f "$(RUN)/model.pt" && test -n "$(NAME)" || { echo "RUN=<run folder with model.pt> NAME=<file name>"; exit 2; }
	$(BIN)/python -m training export $(RUN)/model.pt model_zoo/models/$(NAME).onnx
	$(BIN)/python -m training calibrate model_zoo/models/$(NAME).onnx $(EVAL_SETS)
	$(BIN)/python -m training quantize model_zoo/models/$(NAME).onnx $(TRAIN_SETS)
	$(BIN)/python -m training fp16 model_zoo/models/$(NAME).onnx $(TRAIN_SETS)
	$(MAKE) model-figures MODEL=model_zoo/models/$(NAME)

# Retail-0277 (the default's first member, shipped alone too) and the fast tier, remade from Intel's Open Model Zoo
# IRs (Apache-2.0): imported with the parity checks (against OpenVINO too), then their thresholds calibrated on
# CUHK03-val. WEIGHTS: the folder with person-reidentification-retail-0277-FP16.{xml,bin}, -0286-FP16, -0287-FP32
# and -0288-FP32 (their addresses: the cards).
WEIGHTS ?= ../shared/weights/openvino
OMZ_URL := https://github.com/openvinotoolkit/open_model_zoo/tree/master/models/intel
import-omz: $(VENV)/.test-$(RUNTIME)
	for ir in 0277-FP16 0288-FP32; do n=$${ir%-*}; \
		$(BIN)/python -m model_zoo import $(WEIGHTS)/person-reidentification-retail-$$ir.xml model_zoo/models/person_reidentification_retail_$$n.onnx \
			--licence Apache-2.0 --url $(OMZ_URL)/person-reidentification-retail-$$n --training-data "not published by Intel" \
			--real-images $(DATA)/cuhk03-detected/query && \
		$(BIN)/python -m training calibrate model_zoo/models/person_reidentification_retail_$$n.onnx $(EVAL_SETS) --quiet || exit 1; done

# The default, the accurate ensemble, remade from the same IRs: retail-0286 and retail-0287 imported as above (into
# build/ensemble, not shipped alone), written with the shipped retail-0277 as one file's three branches (python -m
# model_zoo ensemble), then its threshold calibrated on CUHK03-val and its int8 file made.
import-default: import-omz
	mkdir -p build/ensemble
	for ir in 0286-FP16 0287-FP32; do n=$${ir%-*}; \
		$(BIN)/python -m model_zoo import $(WEIGHTS)/person-reidentification-retail-$$ir.xml build/ensemble/person_reidentification_retail_$$n.onnx \
			--licence Apache-2.0 --url $(OMZ_URL)/person-reidentification-retail-$$n --training-data "not published by Intel" \
			--real-images $(DATA)/cuhk03-detected/query || exit 1; done
	$(BIN)/python -m model_zoo ensemble model_zoo/models/person_reidentification_retail_0277.onnx \
		build/ensemble/person_reidentification_retail_0286.onnx build/ensemble/person_reidentification_retail_0287.onnx \
		$(DEFAULT_MODEL).onnx
	$(BIN)/python -m training calibrate $(DEFAULT_MODEL).onnx $(EVAL_SETS) --quiet
	$(BIN)/python -m training quantize $(DEFAULT_MODEL).onnx $(TRAIN_SETS)

# Every shipped model, and the imported public models it is judged against, in one table: accuracy and CPU
# images/s side by side in one run (bench/model_candidates.py). IMPORTED: a folder of further candidates'
# .onnx files (python -m model_zoo import writes them; they are not shipped).
IMPORTED ?= build/candidates
candidates: $(VENV)/.test-$(RUNTIME)
	$(BIN)/python -m bench.model_candidates --data $(DATA) --output bench/results/model_candidates.json \
		$(DEFAULT_MODEL).onnx $(filter-out %.fp16.onnx $(DEFAULT_MODEL).onnx,$(wildcard model_zoo/models/*.onnx)) $(wildcard $(IMPORTED)/*.onnx)

# A shipped model's files on the three validation sets: fp32, and int8 and fp16 where it has them. MODEL: the
# file without .onnx (default: the shipped default).
MODEL ?= $(DEFAULT_MODEL)
model-figures: $(VENV)/.test-$(RUNTIME)
	for p in "" .int8 .fp16; do test -f $(MODEL)$$p.onnx || continue; \
		$(BIN)/python -m training evaluate $(MODEL)$$p.onnx $(EVAL_SETS) --quiet --output $(FIGURES)/accuracy_$$(basename $(MODEL))$$p.json || exit 1; done

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
