# Two commands on a fresh machine: `make demo` (install + the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The real datasets: ../shared/data when present (dev machines and CI), else the loaders'
# default (~/.cache/umim/data, downloaded on first use). Override with UMIM_DATA_ROOT=...
SHARED_DATA := $(abspath ../shared/data)
export UMIM_DATA_ROOT ?= $(if $(wildcard $(SHARED_DATA)/medmnist),$(SHARED_DATA),)

.PHONY: install demo test lint clean bench-env

$(BIN)/umim: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/umim

demo: install
	$(BIN)/umim data list
	@if [ -f runs/quickstart/config.yaml ]; then $(BIN)/umim resume runs/quickstart; \
	else $(BIN)/umim run experiments/quickstart.yaml --out runs/quickstart; fi
	$(BIN)/umim report runs/quickstart

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# pfl-research for `umim bench crossdevice`, in its own folder under the umim cache (pfl's
# dp-accounting pins attrs<24; this venv holds attrs 26)
bench-env: install
	$(BIN)/python -m engine.bench.crossdevice_pfl create-env

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
