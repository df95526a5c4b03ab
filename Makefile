# w2w: `make demo` and `make test` work on a fresh clone; each installs what is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SWEEP ?= runs/demo
DEMO_GRID ?= shards=2 precision=fp32 batch_size=4,8 max_gen_len=16,32 dataset.num_prompts=16
PYTEST_ARGS ?=
CONSTRAINTS ?= constraints-cpu.txt
VENV_FLAGS ?=

SERVING_SWEEP ?= runs/serving
SERVING_GRID ?= scenario=serving precision=fp32 greedy=true max_gen_len=16 dataset.num_prompts=12 serving.rate=20,inf serving.max_slots=2,4 energy.idle_seconds=0

.PHONY: install demo serving test lint bench bench-launches bench-decode bench-reduce bench-plan bench-gpu gpu-check gpu-accept slurm-up slurm-down slurm-status tiny-tokenizer clean

install: $(STAMP)

# The CPU build of torch that lies on disk (constraints-cpu.txt); a plain `pip install -e .`
# on a cluster keeps the site's CUDA torch instead.
$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	touch $(STAMP)

demo: install
	rm -rf $(SWEEP)
	$(VENV)/bin/w2w-sweep --wait --poll 2 sweep_dir=$(SWEEP) $(DEMO_GRID)
	$(VENV)/bin/w2w-reduce $(SWEEP)

# A small serving sweep on the CPU (tiny model: two rates x two slot counts), then its frontier table.
serving: install
	rm -rf $(SERVING_SWEEP)
	$(VENV)/bin/w2w-run sweep_dir=$(SERVING_SWEEP) $(SERVING_GRID)
	$(PY) -m w2w.analysis.serving $(SERVING_SWEEP)

# CI=true: SLURM tests must run, so the local SLURM is provisioned first (needs root).
# Each run gets a base temp folder of its own: two runs sharing /tmp/pytest-of-USER prune each
# other's folders, even one a SLURM job is still writing. pytest wipes the folder it is given, so it
# is made fresh per run; 0755 lets the SLURM jobs read it. Kept, and named, when the run fails.
test: install
	@if [ "$${CI:-}" = "true" ]; then bash launch/slurm_local.sh up; fi
	@base=$$(mktemp -d "$${TMPDIR:-/tmp}/w2w-pytest.XXXXXX") && chmod 755 "$$base" && \
	if $(PY) -m pytest -q --basetemp="$$base/t" $(PYTEST_ARGS); then rm -rf "$$base"; \
	else status=$$?; echo "pytest failed (exit $$status); its temp folder is kept: $$base/t" >&2; exit $$status; fi

# ruff, then the import layers of pyproject.toml (import-linter over the package as installed).
lint: install
	$(VENV)/bin/ruff check w2w launch analysis tests
	LINT_IMPORTS=$(VENV)/bin/lint-imports bash .ci/lint_imports.sh

bench: bench-launches bench-decode bench-reduce bench-plan

# Operators per decode step per layer for each engine (ATen calls traced on the CPU): launches on a GPU.
# BENCH_*_ARGS: more arguments for one benchmark (the tests run each in a tiny mode through them).
BENCH_LAUNCHES_ARGS ?=
BENCH_DECODE_ARGS ?=
BENCH_REDUCE_ARGS ?=
BENCH_PLAN_ARGS ?=
bench-launches: install
	$(PY) -m w2w.bench.launches $(BENCH_LAUNCHES_ARGS)

bench-decode: install
	$(PY) -m w2w.bench.decode_vs_transformers $(BENCH_DECODE_ARGS)

# The reducer on 200 cells x 32 ranks with 10-minute 100 ms timelines: records/s, samples/s, < 60 s.
bench-reduce: install
	$(PY) -m w2w.bench.reduce_scale $(BENCH_REDUCE_ARGS)

# Every engine vs transformers eager, 7B-shaped fp16 weights drawn on the GPU, batch 1/16/64: tok/s,
# ratio, decode step vs the HBM roof, W and J/token. No venv and no network: the python that has
# the project installed (see ../shared/GPU.md). Dry run of the logic: BENCH_GPU_ARGS="--device cpu --tiny".
BENCH_PY ?= python3
BENCH_GPU_ARGS ?=
bench-gpu:
	$(BENCH_PY) -m w2w.bench.gpu_engines $(BENCH_GPU_ARGS)

# Login-node speed: Hydra composition per cell vs cached, planning imports with vs without torch.
bench-plan: install
	$(PY) -m w2w.bench.plan_speed $(BENCH_PLAN_ARGS)

# The python that has the project installed and sees the CUDA torch, offline (../shared/GPU.md).
gpu-check:
	$(BENCH_PY) -m w2w.gpu_check

# The GPU acceptance run: each step with its own timeout, a JSON summary in runs/gpu_accept/.
# Dry run of every step on the CPU: GPU_ACCEPT_ARGS="--device cpu".
GPU_ACCEPT_ARGS ?=
gpu-accept:
	$(BENCH_PY) -m w2w.gpu_accept $(GPU_ACCEPT_ARGS)

slurm-up:
	bash launch/slurm_local.sh up

slurm-down:
	bash launch/slurm_local.sh down

slurm-status:
	bash launch/slurm_local.sh status

# TINY_TOKENIZER_OUT=FILE writes it there instead of over the bundled one.
TINY_TOKENIZER_OUT ?=
tiny-tokenizer: install
	$(PY) -m w2w.tokenizer $(TINY_TOKENIZER_OUT)

clean:
	rm -rf runs .pytest_cache .ruff_cache

# ---------------------------------------------------------------------------------------------
# Reproducing the paper: Samsi et al., "From Words to Watts: Benchmarking the Energy Costs of Large
# Language Model Inference", IEEE HPEC 2023, arXiv 2310.03003 (its published values: analysis/paper.py).
# Each paper-* target submits one preset's sweep from the login node and returns (PAPER_ARGS=--wait
# follows it; PAPER_ARGS=--plan only prints the jobs); re-running submits only unfinished cells. When
# the sweep has finished, anywhere:  make paper-report SWEEP=DIR
#   CLUSTER=supercloud   profile (conf/cluster/) for the V100 cells
#   CLUSTER_A100=...     profile for the A100 cells; default <CLUSTER>_a100 where it exists, else CLUSTER
#   CKPT_ROOT=DIR        Meta-format LLaMA checkpoints in DIR/7B, DIR/13B, DIR/65B (or CKPT_7B=... each)
#   PAPER_RUNS=runs      sweep directories go to PAPER_RUNS/<preset>
#   PAPER_ARGS=...       more w2w-sweep arguments, e.g. --wait, --plan, power_cap_w=null (no right to cap)
CLUSTER ?= supercloud
CLUSTER_A100 ?= $(if $(wildcard conf/cluster/$(CLUSTER)_a100.yaml),$(CLUSTER)_a100,$(CLUSTER))
CKPT_ROOT ?=
CKPT_7B ?= $(if $(CKPT_ROOT),$(CKPT_ROOT)/7B)
CKPT_13B ?= $(if $(CKPT_ROOT),$(CKPT_ROOT)/13B)
CKPT_65B ?= $(if $(CKPT_ROOT),$(CKPT_ROOT)/65B)
PAPER_RUNS ?= runs
PAPER_ARGS ?=
# The presets read these (oc.env) for each sub-grid's cluster profile and checkpoint folder.
PAPER_ENV = W2W_CLUSTER_V100=$(CLUSTER) W2W_CLUSTER_A100=$(CLUSTER_A100) \
	$(if $(CKPT_7B),W2W_CKPT_7B=$(CKPT_7B)) $(if $(CKPT_13B),W2W_CKPT_13B=$(CKPT_13B)) \
	$(if $(CKPT_65B),W2W_CKPT_65B=$(CKPT_65B))
# Random weights would make every response max length: refuse to submit without checkpoints.
paper_need = $(if $(findstring --plan,$(PAPER_ARGS)),,$(foreach m,$(1),$(if $(CKPT_$(m)),,$(error \
	$@ needs the LLaMA $(m) checkpoint: set CKPT_ROOT=DIR (holding $(m)/) or CKPT_$(m)=DIR; PAPER_ARGS=--plan plans without))))
paper_sweep = $(PAPER_ENV) $(VENV)/bin/w2w-sweep +experiment=$(1) sweep_dir=$(PAPER_RUNS)/$(1) $(PAPER_ARGS)

.PHONY: paper paper-fig2 paper-fig3 paper-fig4-9 paper-table3 paper-table4-5 paper-report

# Figs 2 and 3 (and Table II) come from one sweep: either target submits it.
paper-fig2 paper-fig3: install
	$(call paper_need,7B 13B 65B)
	$(call paper_sweep,paper_fig2_3)

paper-fig4-9: install
	$(call paper_need,65B)
	$(call paper_sweep,paper_fig4_9)

paper-table3: install
	$(call paper_need,65B)
	$(call paper_sweep,paper_table3)

paper-table4-5: install
	$(call paper_need,65B)
	$(call paper_sweep,paper_table4_5)

# Every artifact in one sweep (shared cells run once); report it with SWEEP=$(PAPER_RUNS)/paper_all.
paper: install
	$(call paper_need,7B 13B 65B)
	$(call paper_sweep,paper_all)

# Tables (Markdown, CSV, LaTeX), figures, the comparison with the published numbers: SWEEP/results/paper/.
paper-report: install
	$(PY) -m w2w.analysis.report $(SWEEP)
