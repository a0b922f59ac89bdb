# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv (Python >= 3.11) and install midasbench with the pinned known-good stack
# (constraints.txt) on first use; later runs reuse it until pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= test,speech,cluster

.PHONY: demo test lint format bench install clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "midasbench needs Python >= 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/midasbench demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

BENCHMARKS := bench_arrow_gather bench_loader bench_midas_cost bench_sweep_overhead bench_ray_train bench_parallel_trials bench_gpu bench_tracking_load

# every table is printed; the exit status is 1 if any script missed its goal
bench: $(STAMP)
	@status=0; for b in $(BENCHMARKS); do $(BIN)/python benchmarks/$$b.py || status=1; done; exit $$status

clean:
	rm -rf $(VENV) .midasbench mlflow.db mlartifacts .pytest_cache .ruff_cache
