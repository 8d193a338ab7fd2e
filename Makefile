# The two commands a newcomer types: `make demo` and `make test`. Both install into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test unit integration lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[cpu,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bi150-ray demo --root demo_out

lint: $(STAMP)
	$(BIN)/ruff check bi150_ray jobs tests bench

# pytest exits 5 when it collects nothing; that is not a failure of the code under test.
test: $(STAMP) lint
	$(BIN)/python -m pytest tests -q -rfE --durations=0 --durations-min=5 || [ $$? -eq 5 ]

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit -q || [ $$? -eq 5 ]

integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration -q -rA --durations=0 || [ $$? -eq 5 ]

bench: $(STAMP)
	$(BIN)/python bench/launch_overhead.py

clean:
	rm -rf demo_out bi150_runs .pytest_cache
