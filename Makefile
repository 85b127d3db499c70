# The two set-up commands of the README: `make demo` (the main job) and `make test` (the tests).
# Both create the virtual environment on first use (scripts/setup-venv.sh); FFTMOE_VENV moves it.
VENV ?= $(or $(FFTMOE_VENV),.venv)
PY := $(VENV)/bin/python
export FFTMOE_VENV := $(VENV)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-fast demo bench bench-edge bench-bound bundles bench-agnews bench-skew

venv:
	@bash scripts/setup-venv.sh

## Run the whole test suite (tiny encoders, plus the real MiniLM in the tests marked slow).
test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

## Only the fast tests (tiny encoders).
test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

## The main job: a whole federation on this machine. Exports all-MiniLM-L6-v2 with MoE adapters (tiers 2,4,8, AG
## News' four labels) into runs/minilm-bundle once, then simulates 20 devices of three tiers on AG News, Dirichlet
## alpha 0.5, into runs/demo (running it again continues the run). Data: AG_NEWS=path/to/ag_news.csv (the columns of
## ../shared/data/ag_news/, used when present), else `ag_news` from the Hugging Face hub (needs network).
AG_NEWS ?= $(firstword $(wildcard ../shared/data/ag_news/ag_news_6000.csv) ag_news)
AG_LABELS := 1=World,2=Sports,3=Business,4=Sci/Tech
AG_NEWS_COLUMNS = $(if $(filter %.csv,$(AG_NEWS)),--text-column title --text-column description --label-map $(AG_LABELS))
DEMO_ARGS ?= --clients 20 --fleet three-tiers --alpha 0.5 --rounds 5 --fraction 0.5 --local-steps 8 --max-seq-len 64
demo: venv
	@test -f runs/minilm-bundle/manifest.json || $(VENV)/bin/fftmoe-export --tiers 2,4,8 --labels World,Sports,Business,Sci/Tech --out runs/minilm-bundle --force
	$(VENV)/bin/fftmoe-coordinator simulate --bundle runs/minilm-bundle --data $(AG_NEWS) $(AG_NEWS_COLUMNS) --out runs/demo $(DEMO_ARGS)

## Exporter benchmark on MiniLM: export time, artifact sizes, ORT vs PyTorch step time, peak RSS, per tier.
bench: venv
	$(PY) benchmarks/export_bench.py --tiers 2,4,8

## Edge runtime benchmark: ORT training-API import with and without torch; ORT vs PyTorch backend per tier on
## real AG News batches (needs `make demo`'s bundle and the AG News CSV: AG_NEWS=path/to/ag_news.csv).
AG_NEWS ?= ../shared/data/ag_news/ag_news_6000.csv
bench-edge: venv
	$(PY) benchmarks/edge_bench.py --bundle runs/minilm-bundle --data $(AG_NEWS)

## How close honest training comes to the coordinator's default update bound (--max-update-norm auto), per tier,
## learning rate and unit kind, on real AG News rows (needs `make demo`'s bundle; docs/security.md).
bench-bound: venv
	$(PY) benchmarks/update_bound_bench.py --data $(AG_NEWS)

## The AG News benchmark of docs/benchmarks.md. `make bundles` exports MiniLM once per method (FFT-MoE, its ablation
## without auxiliary losses, FedIT rank 33, HetLoRA ranks 14/29/58; tiers 2,4,8). `make bench-agnews` then runs every
## method in METHODS at every alpha in ALPHAS (iid: IID) into runs/bench/<method>-<alpha> (a stopped run continues
## when started again) and compares them. BENCH_ARGS holds what every run shares.
LABELS4 := World,Sports,Business,Sci/Tech
METHODS ?= fftmoe fedit hetlora fftmoe-noaux
ALPHAS ?= 0.1 0.5 iid
BENCH_ARGS ?= --clients 20 --fleet three-tiers --rounds 20 --fraction 0.5 --local-steps 8 --batch-size 16 --max-seq-len 64 --min-partition-size 5 --eval-every 5
bundles: venv
	@test -f runs/minilm-bundle/manifest.json || $(VENV)/bin/fftmoe-export --tiers 2,4,8 --labels $(LABELS4) --out runs/minilm-bundle --force
	@test -f runs/fftmoe-noaux-bundle/manifest.json || $(VENV)/bin/fftmoe-export --tiers 2,4,8 --alpha 0 --beta 0 --labels $(LABELS4) --no-measure --out runs/fftmoe-noaux-bundle --force
	@test -f runs/fedit-bundle/manifest.json || $(VENV)/bin/fftmoe-export --method fedit --ranks 33 --tiers 2,4,8 --labels $(LABELS4) --no-measure --out runs/fedit-bundle --force
	@test -f runs/hetlora-bundle/manifest.json || $(VENV)/bin/fftmoe-export --method hetlora --ranks 14,29,58 --tiers 2,4,8 --labels $(LABELS4) --no-measure --out runs/hetlora-bundle --force
bench-agnews: bundles
	@for m in $(METHODS); do for a in $(ALPHAS); do \
	  b=runs/$$m-bundle; [ $$m = fftmoe ] && b=runs/minilm-bundle; \
	  p="--alpha $$a"; [ $$a = iid ] && p="--partition iid"; \
	  $(VENV)/bin/fftmoe-coordinator simulate --bundle $$b --data $(AG_NEWS) $(AG_NEWS_COLUMNS) --out runs/bench/$$m-$$a $$p $(BENCH_ARGS) || exit $$?; \
	done; done
	$(VENV)/bin/fftmoe-coordinator compare runs/bench/*/ --plot runs/bench/compare.png

## Issue 18's paired seeds at alpha 0.1: FFT-MoE and FedIT (rank 33), both with the frozen closed-form head, the
## logit-adjusted loss (tau 1) and the head re-solved after the last round; then each seed's linear probe, and the
## paired table. About 12 minutes per run on 2 cores; SKEW_SEEDS are the seeds whose partition exists with 5 rows.
SKEW_SEEDS ?= 3 4 8 9 11
SKEW_ARGS ?= --clients 20 --fleet three-tiers --rounds 20 --fraction 0.5 --local-steps 8 --batch-size 16 --max-seq-len 64 \
  --min-partition-size 5 --eval-every 5 --alpha 0.1 --head ridge-frozen --logit-adjust 1 --ridge-resolve
bench-skew: bundles
	@for s in $(SKEW_SEEDS); do for m in fftmoe fedit; do \
	  b=runs/$$m-bundle; [ $$m = fftmoe ] && b=runs/minilm-bundle; \
	  $(VENV)/bin/fftmoe-coordinator simulate --bundle $$b --data $(AG_NEWS) $(AG_NEWS_COLUMNS) --out runs/skew/$$m-rf-la1-0.1-s$$s --seed $$s $(SKEW_ARGS) || exit $$?; \
	done; \
	test -f runs/skew/fftmoe-rf-la1-0.1-s$$s/reference-probe.json || $(VENV)/bin/fftmoe-coordinator reference --out runs/skew/fftmoe-rf-la1-0.1-s$$s --kind probe || exit $$?; \
	done
	$(VENV)/bin/fftmoe-coordinator compare runs/skew/*-rf-la1-0.1-s*/ --paired --markdown --plot runs/skew/compare.png
