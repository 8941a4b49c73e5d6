# slurm_ray: one command to try it (make demo), one to test it (make test).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PY ?= python3
VENV := .venv
STAMP := $(VENV)/.slurm_ray_installed
CLUSTER := scripts/devcluster.sh
PYTEST_ARGS ?=
# make test: pytest-xdist workers. The real tiers run in TEST_LANES lanes, each
# in order on one worker with its own MLflow/Airflow, sharing the cluster
# (tests/lanes.py); the pure and local-Ray tiers beside them.
# TEST_WORKERS=0: all in one process.
TEST_LANES ?= 1
TEST_WORKERS ?= 2

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

# The Airflow-side environment: rebuilt when a requirements file changes.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	@$(PY) -c 'import ensurepip, venv' 2>/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-venv; }
	@# docker-compose validates docker-compose.yaml offline in the tests (no engine needed)
	@# chromium + chromedriver: the browser tests (tests/e2e/test_ui_browser.py), Debian's build, never a download
	@# postgresql-15: the local Airflow's metadata DB (scripts/postgres_local.sh: a private cluster per
	@# Airflow); createcluster.d keeps the package from creating and starting a system-wide "main" cluster
	@command -v docker-compose >/dev/null && command -v ssh-keygen >/dev/null && command -v curl >/dev/null && \
	  command -v chromium >/dev/null && command -v chromedriver >/dev/null && test -x /usr/lib/postgresql/15/bin/postgres || \
	  { apt-get update -qq && \
	    { test -e /usr/share/postgresql-common || { mkdir -p /etc/postgresql-common/createcluster.d && \
	      echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/slurm-ray.conf; }; } && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose openssh-client curl chromium chromium-driver postgresql-15; }
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

venv: $(STAMP)  ## Airflow-side virtualenv (.venv)

cluster-up:  ## start the local Slurm cluster + sshd (+ cluster-side venv); idempotent
	bash $(CLUSTER) up

cluster-status:  ## sinfo, squeue and the login node's sshd
	bash $(CLUSTER) status

cluster-down:  ## stop everything the cluster started (by PID) and remove its network
	bash $(CLUSTER) down

lint: venv  ## ruff + mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check plugins dags tests include bench
	$(VENV)/bin/mypy

# Brings the cluster up, runs every test, and brings it down even when tests fail.
test: venv  ## set everything up and run all tests (pure + real cluster)
	@rc=0; \
	bash $(CLUSTER) up || rc=$$?; \
	if [ $$rc -eq 0 ]; then \
	  SLURM_RAY_REQUIRE_CLUSTER=1 TEST_LANES=$(TEST_LANES) $(VENV)/bin/pytest -ra --durations=15 \
	    -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS) || rc=$$?; \
	  bash $(CLUSTER) status || true; \
	fi; \
	bash $(CLUSTER) down || true; \
	exit $$rc

test-unit: venv  ## pure tests only (no cluster)
	$(VENV)/bin/pytest -m 'not cluster and not slow' -n $(TEST_WORKERS) $(PYTEST_ARGS)

mlflow-up:  ## local MLflow server on 127.0.0.1:5055 (needs the cluster-side venv)
	bash scripts/mlflow_server.sh start

mlflow-down:
	bash scripts/mlflow_server.sh stop

airflow-up: venv  ## local Airflow (standalone, LocalExecutor, PostgreSQL) on 127.0.0.1:8080
	bash scripts/airflow_local.sh start

airflow-down:
	bash scripts/airflow_local.sh stop

# Leaves the UIs running for the user; `make down` stops everything.
demo: venv cluster-up mlflow-up airflow-up  ## set everything up and run the main job
	$(VENV)/bin/python scripts/demo.py $(if $(DEMO_CONF),--conf '$(DEMO_CONF)')

down:  ## stop everything make demo started (Airflow, MLflow, the cluster)
	bash scripts/airflow_local.sh stop || true
	bash scripts/mlflow_server.sh stop || true
	bash $(CLUSTER) down

.PHONY: help venv cluster-up cluster-status cluster-down lint test test-unit demo down mlflow-up mlflow-down airflow-up airflow-down

# Every benchmark in bench/ in turn (BENCH_QUICK=1: fewer repetitions), then
# bench/results.md. Starts MLflow/Airflow for the demo benchmark only if they are
# down (and stops them again); never stops the cluster.
BENCHES := ray_formation watch_jobs train_throughput demo_walltime
bench: venv cluster-up  ## run every benchmark -> bench/results.md (BENCH_QUICK=1: shorter)
	@rc=0; for b in $(BENCHES); do \
	  echo "== bench/bench_$$b.py"; \
	  $(VENV)/bin/python bench/bench_$$b.py || rc=$$?; \
	done; \
	echo "== bench/bench_demo_walltime.py --long 90s"; \
	$(VENV)/bin/python bench/bench_demo_walltime.py --long 90s || rc=$$?; \
	echo "== bench/bench_demo_walltime.py --long 10min --pairs 1 (21 min a pair)"; \
	$(VENV)/bin/python bench/bench_demo_walltime.py --long 10min --pairs 1 || rc=$$?; \
	$(VENV)/bin/python bench/_report.py; \
	exit $$rc

.PHONY: bench

# The fault suite with repetitions (SLURM_RAY_FAULT_TRIALS=5) -> bench/reliability.md.
# Brings the cluster up, runs, and brings it down even when tests fail.
test-faults: venv  ## fault suite, each fault repeated (5 trials) -> bench/reliability.md
	@rc=0; \
	bash $(CLUSTER) up || rc=$$?; \
	if [ $$rc -eq 0 ]; then \
	  rm -f bench/out/reliability/results-*.jsonl; \
	  SLURM_RAY_REQUIRE_CLUSTER=1 SLURM_RAY_FAULT_TRIALS=5 $(VENV)/bin/pytest -m faults -ra --durations=15 $(PYTEST_ARGS) || rc=$$?; \
	  bash $(CLUSTER) status || true; \
	fi; \
	bash $(CLUSTER) down || true; \
	exit $$rc

.PHONY: test-faults
