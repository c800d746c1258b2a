# `make test` and `make demo` set themselves up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo demo-dpo demo-gold reproduce-length bench clean

install: $(STAMP)

# torch is installed first and pinned: a plain `torch` would pull a multi-GB CUDA build.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

# The embedded reproduction: SFT, RL, DeRa sweep, retraining, report (CPU, minutes).
DEMO_DIR ?= runs/length_reward_tiny
demo: install
	$(PY) -m dera_t5x.reproduce --gin_file=gin/reproduce/length_reward_tiny.gin \
		--output_dir=$(DEMO_DIR)
	@echo "Report: $(DEMO_DIR)/report.md"

# DeRa on DPO-aligned models against DPO retrained at beta / lambda (CPU, minutes).
DPO_DIR ?= runs/dpo_length_tiny
demo-dpo: install
	$(PY) -m dera_t5x.reproduce --gin_file=gin/reproduce/dpo_length_tiny.gin \
		--output_dir=$(DPO_DIR)
	@echo "Report: $(DPO_DIR)/report.md"

# A proxy reward model trained on gold-labelled pairs, RL against it, DeRa vs
# retrained RL scored by proxy and gold, an oracle RL run on gold, lambda chosen by
# gold (CPU, about 22 minutes on 2 cores).
GOLD_DIR ?= runs/gold_proxy_tiny
demo-gold: install
	$(PY) -m dera_t5x.reproduce --gin_file=gin/reproduce/gold_proxy_tiny.gin \
		--output_dir=$(GOLD_DIR)
	@echo "Report: $(GOLD_DIR)/report.md"

# DeRa against retrained RL over 3 seeds sharing one SFT model: means, sd across
# seeds, objectives with standard errors, the toy's predicted gap (CPU, < 1 hour).
LENGTH_DIR ?= runs/length_reward_seeds
reproduce-length: install
	$(PY) -m dera_t5x.seeds --gin_file=gin/reproduce/length_reward_seeds.gin \
		--output_dir=$(LENGTH_DIR)
	@echo "Report: $(LENGTH_DIR)/report.md"

clean:
	rm -rf $(VENV) .pytest_cache
