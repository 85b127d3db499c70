# The two set-up commands of the README: `make demo` (the main job) and `make test` (the tests).
# Both create the virtual environment on first use (scripts/setup-venv.sh); FFTMOE_VENV moves it.
VENV ?= $(or $(FFTMOE_VENV),.venv)
PY := $(VENV)/bin/python
export FFTMOE_VENV := $(VENV)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-fast demo bench bench-edge

venv:
	@bash scripts/setup-venv.sh

## Run the whole test suite (tiny encoders, plus the real MiniLM in the tests marked slow).
test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

## Only the fast tests (tiny encoders).
test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

## The main job: export all-MiniLM-L6-v2 with MoE adapters as tiers 2,4,8 for AG News' four labels.
demo: venv
	$(VENV)/bin/fftmoe-export --tiers 2,4,8 --labels World,Sports,Business,Sci/Tech --out runs/minilm-bundle --force

## Exporter benchmark on MiniLM: export time, artifact sizes, ORT vs PyTorch step time, peak RSS, per tier.
bench: venv
	$(PY) benchmarks/export_bench.py --tiers 2,4,8

## Edge runtime benchmark: ORT training-API import with and without torch; ORT vs PyTorch backend per tier on
## real AG News batches (needs `make demo`'s bundle and the AG News CSV: AG_NEWS=path/to/ag_news.csv).
AG_NEWS ?= ../shared/data/ag_news/ag_news_6000.csv
bench-edge: venv
	$(PY) benchmarks/edge_bench.py --bundle runs/minilm-bundle --data $(AG_NEWS)
