# The two commands a newcomer types: `make demo` and `make test`. Both install into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A second venv with torch + transformers, only for checking `bi150-ray export-hf` against Hugging Face's
# own LlamaForCausalLM (they would upgrade packages PaddleNLP needs if installed next to it).
HF_VENV := .venv-hf
HF_STAMP := $(HF_VENV)/.installed

.PHONY: install demo test unit integration lint bench clean

$(STAMP): pyproject.toml setup.py bi150_ray/data/_kernels.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[cpu,dev]"
	touch $(STAMP)

$(HF_STAMP):
	test -x $(HF_VENV)/bin/python || $(PY) -m venv $(HF_VENV)
	$(HF_VENV)/bin/python -m pip install --quiet torch==2.13.0 transformers==5.24.0
	touch $(HF_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bi150-ray demo --root demo_out

lint: $(STAMP)
	$(BIN)/ruff check bi150_ray jobs tests bench

# pytest exits 5 when it collects nothing; that is not a failure of the code under test.
test: $(STAMP) $(HF_STAMP) lint
	BI150_RAY_HF_PYTHON=$(HF_VENV)/bin/python $(BIN)/python -m pytest tests -q -rfE --durations=0 --durations-min=5 || [ $$? -eq 5 ]

unit: $(STAMP) $(HF_STAMP)
	BI150_RAY_HF_PYTHON=$(HF_VENV)/bin/python $(BIN)/python -m pytest tests/unit -q || [ $$? -eq 5 ]

integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration -q -rA --durations=0 || [ $$? -eq 5 ]

bench: $(STAMP)
	$(BIN)/python bench/launch_overhead.py

clean:
	rm -rf demo_out bi150_runs .pytest_cache
