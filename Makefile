# streamlift: `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FLINK_HOME = $(shell $(BIN)/python -c 'import pyflink, os; print(os.path.dirname(pyflink.__file__))')
DATA ?= data
EVENTS ?= 200000
JOB ?= features
JVM := .jvm
KAFKA_STAMP := $(JVM)/.fetched

.DEFAULT_GOAL := help
.PHONY: help venv kafka-jars kafka-up kafka-down redis postgres chromium demo report test fuzz test-fast bench cluster-up cluster-down submit simulate lock clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): requirements.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP) ## create .venv with the pinned dependency set

demo: $(STAMP) $(KAFKA_STAMP) ## simulate EVENTS events, run the features, outcomes and learner jobs locally, read features, tables, models back
	$(BIN)/python -m tools.demo --events $(EVENTS) --data-dir $(DATA)/demo

report: $(STAMP) ## one HTML page of plots from the demo's run (after make demo): $(DATA)/demo/run/report.html
	$(BIN)/python -m tools.report --data-dir $(DATA)/demo/run

chromium: ## install Debian's chromium if missing (the report test opens the page in it, headless)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

$(KAFKA_STAMP): kafka/pom.xml
	mvn -q -B -f kafka/pom.xml dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(abspath $(JVM))/kafka-broker
	mvn -q -B -f kafka/pom.xml -P connector dependency:copy-dependencies -DincludeArtifactIds=flink-sql-connector-kafka -DoutputDirectory=$(abspath $(JVM))/connectors
	touch $(KAFKA_STAMP)

kafka-jars: $(KAFKA_STAMP) ## fetch the Kafka broker and the Flink Kafka connector from Maven Central (versions in kafka/pom.xml)

kafka-up: $(STAMP) $(KAFKA_STAMP) ## start a local Kafka broker (KRaft) on KAFKA_PORT (default 9092), data in $(DATA)/kafka
	$(BIN)/python -m tools.broker up --dir $(DATA)/kafka $(if $(KAFKA_PORT),--port $(KAFKA_PORT))

kafka-down: $(STAMP) ## stop the local Kafka broker
	$(BIN)/python -m tools.broker down --dir $(DATA)/kafka

redis: ## install Debian's redis-server if missing (the Feast-on-Redis tests start their own on a free port)
	@command -v redis-server >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; }

postgres: ## install Debian's postgresql if missing (the at-scale test starts its own server on a free port)
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }

test: $(STAMP) $(KAFKA_STAMP) redis postgres chromium ## run the whole test suite (unit, mini-cluster job tests, cluster submission, Feast on Redis, the at-scale profile on PostgreSQL + S3 + Redis)
	$(BIN)/python -m pytest

fuzz: $(STAMP) ## the property-based fuzz tests at full strength (10,000 inputs per target; make test runs 2,500)
	STREAMLIFT_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest tests/test_fuzz.py

test-fast: $(STAMP) ## unit tests only (no JVM)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP) $(KAFKA_STAMP) ## features, outcomes, learner jobs vs baselines (naive state, Flink SQL, Vowpal Wabbit) on 1M events; ONLY=features|outcomes|learner
	$(BIN)/python -m tools.bench --events 1000000 --out bench/results --only $(or $(ONLY),all)

simulate: $(STAMP) ## write simulated traffic to $(DATA)/sim
	$(BIN)/python -m tools.simulate --events $(EVENTS) --out $(DATA)/sim

cluster-up: $(STAMP) ## start a standalone Flink cluster (JobManager + TaskManager on localhost; more: python -m tools.cluster up --taskmanagers 2 --slots 1)
	$(BIN)/python -m tools.cluster up

cluster-down: $(STAMP) ## stop the standalone Flink cluster
	$(BIN)/python -m tools.cluster down

submit: $(STAMP) ## submit JOB (default features) to the cluster with `flink run -py`; INPUT=<sim dir>, P=<parallelism>
	$(BIN)/python -m tools.cluster submit --job $(JOB) --input $(or $(INPUT),$(DATA)/sim) --data-dir $(abspath $(DATA))/cluster $(if $(P),-p $(P))

lock: ## re-resolve requirements.in into requirements.lock
	$(PY) -m venv /tmp/streamlift-lock && /tmp/streamlift-lock/bin/pip install -q -r requirements.in && /tmp/streamlift-lock/bin/pip freeze > requirements.lock

clean: ## remove run data (not the venv)
	rm -rf $(DATA) bench/results
