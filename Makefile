# w2w: `make demo` and `make test` work on a fresh clone; each installs what is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SWEEP ?= runs/demo
DEMO_GRID ?= shards=2 precision=fp32 batch_size=4,8 max_gen_len=16,32 dataset.num_prompts=16
PYTEST_ARGS ?=

.PHONY: install demo test lint bench gpu-check slurm-up slurm-down slurm-status tiny-tokenizer clean

install: $(STAMP)

# The CPU build of torch that lies on disk (constraints-cpu.txt); a plain `pip install -e .`
# on a cluster keeps the site's CUDA torch instead.
$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints-cpu.txt -e '.[dev]'
	touch $(STAMP)

demo: install
	rm -rf $(SWEEP)
	$(VENV)/bin/w2w-sweep --wait --poll 2 sweep_dir=$(SWEEP) $(DEMO_GRID)
	$(VENV)/bin/w2w-reduce $(SWEEP)

# CI=true: SLURM tests must run, so the local SLURM is provisioned first (needs root).
test: install
	@if [ "$${CI:-}" = "true" ]; then bash launch/slurm_local.sh up; fi
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check w2w launch analysis tests benchmarks

bench: install
	$(PY) -m benchmarks.decode_vs_transformers

gpu-check: install
	$(PY) -m w2w.gpu_check

slurm-up:
	bash launch/slurm_local.sh up

slurm-down:
	bash launch/slurm_local.sh down

slurm-status:
	bash launch/slurm_local.sh status

tiny-tokenizer: install
	$(PY) -m w2w.tokenizer

clean:
	rm -rf runs .pytest_cache .ruff_cache
