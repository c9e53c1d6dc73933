PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test bench bench-corpus stress install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the pinned CPU wheel: a bare "torch" dependency would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/raylm run -c configs/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -v --durations=0 tests

# side-by-side benchmarks (never part of `make test`): each prints `<name>: ratio <B/A> (target <T>) <PASS|MISS> ...`
# and writes bench/results/<name>.json. BENCH_ARGS passes flags to one benchmark (e.g. a cut train-cpu matrix);
# HEAVY prefixes each command (on a shared machine: HEAVY=/tmp/heavy, a machine-wide semaphore).
BENCHES := train-cpu train-compile tokenize dedup prepare prepare-scaling serve serve-batching train-gpu
HEAVY ?=
BENCH_ARGS ?=

bench: $(STAMP)
	@fail=0; for b in $(BENCHES); do $(MAKE) --no-print-directory bench-$$b || fail=1; done; \
	echo "--- bench summary"; for b in $(BENCHES); do \
	  $(BIN)/python -c "import json,sys; print(json.load(open(sys.argv[1]))['line'])" bench/results/$$b.json 2>/dev/null \
	  || echo "$$b: no result"; done; exit $$fail

bench-corpus: $(STAMP)
	$(BIN)/python bench/corpus.py

bench-%: $(STAMP)
	$(HEAVY) $(BIN)/python bench/bench_$(subst -,_,$*).py $(BENCH_ARGS)

# long fault and load runs (issue 14; never part of `make test`): each prints its figure and exits 1 when its
# promise is broken. HEAVY prefixes each command, as for bench.
STRESS := train_faults driver_kill load replica_kill tune_repeat

stress: $(STAMP)
	@fail=0; for s in $(STRESS); do echo "--- stress/$$s.py"; \
	  timeout --signal=INT 1800 $(HEAVY) $(BIN)/python stress/$$s.py || fail=1; done; exit $$fail

clean:
	rm -rf $(VENV) outputs
