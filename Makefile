# Two commands do everything on a fresh machine:
#   make run    the gateway on 127.0.0.1:8000 over a real vLLM worker with the default model
#   make test   lint, unit tests and end-to-end tests (real worker, real redis-server)
# ENGINE=cuda installs the CUDA build of vLLM instead of the CPU one.

ENGINE ?= cpu
DATA_DIR ?= .data
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(ENGINE)

.PHONY: run test test-langchain lint lock model tiny-model redis bench bench-gateway bench-throughput bench-plugins bench-lora bench-tenancy bench-hostile bench-affinity bench-soak bench-seam bench-batch clean help
.DEFAULT_GOAL := help

help:
	@echo "make run    run the gateway + a vLLM worker with the default model (port 8000)"
	@echo "make test   install everything, lint, run all tests"
	@echo "make model  convert the default model (SmolLM2-135M-Instruct) once into $(DATA_DIR)"

# Re-installs only when pyproject.toml or a lock file changes; a no-op otherwise.
$(STAMP): pyproject.toml scripts/install.sh $(wildcard requirements/*.lock)
	@scripts/install.sh $(ENGINE)
	@touch $@

model: $(STAMP)
	@$(PY) -m engine_plugins.models smollm2 --data-dir $(DATA_DIR)
	@$(PY) -m engine_plugins.models minilm --data-dir $(DATA_DIR)

tiny-model: $(STAMP)
	@$(PY) -m engine_plugins.models tiny --data-dir $(DATA_DIR)

# COMPILE=1 torch.compiles the model: minutes more at start, ~35% more tokens/s on CPU.
run: $(STAMP)
	@$(PY) -m gateway local --data-dir $(DATA_DIR) $(if $(COMPILE),--compile,)

# Programs the tests start on free ports: redis-server (shared state), dnsmasq (discovery).
redis:
	@scripts/ensure-command.sh redis-server redis-server
	@scripts/ensure-command.sh dnsmasq dnsmasq-base

# Re-resolve every dependency to today's versions (requirements/*.lock); then `make test`.
lock: $(STAMP)
	@scripts/lock.sh

lint: $(STAMP)
	@echo "[lint] ruff"
	@$(VENV)/bin/ruff check gateway engine_plugins tests
	@echo "[lint] mypy"
	@$(VENV)/bin/mypy

# checkov scans the rendered chart (tests/unit/test_helm_chart.py), from a venv of its own:
# its pinned dependencies stay out of the project's.
CHECKOV := .tools/checkov/bin/checkov
$(CHECKOV):
	@python3 -m venv .tools/checkov
	@.tools/checkov/bin/python -m pip install -q checkov==3.3.30

test: $(STAMP) redis lint model tiny-model $(CHECKOV)
	@$(VENV)/bin/pytest -v -rA --durations=10

# LangChain's standard integration tests for ChatFireworks through the gateway alone (~4 min
# on CPU; `make test` runs them too).
test-langchain: $(STAMP) model
	@$(VENV)/bin/pytest -v -rA tests/e2e/test_langchain_standard.py

clean:
	rm -rf $(VENV) $(DATA_DIR) .tools

# Benchmarks print tables; they are not tests. bench-gateway measures the gateway beside
# vllm-router (in its own environment), and also over a real worker when WORKER=http://host:port
# points at one.
ROUTER := .bench/router/bin/vllm-router
$(ROUTER):
	@python3 -m venv .bench/router
	@.bench/router/bin/python -m pip install -q vllm-router==0.1.17

bench-gateway: $(STAMP) $(ROUTER)
	@$(PY) -m bench.gateway --router $(ROUTER) $(if $(WORKER),--worker $(WORKER),)

bench-plugins: $(STAMP) model
	@$(PY) -m pip install -q matplotlib 2>/dev/null
	@$(PY) -m bench.plugins --data-dir $(DATA_DIR)
	@$(PY) -m bench.surprise --data-dir $(DATA_DIR) --out docs/mirostat-surprise.png

# What the CPU LoRA correction (engine_plugins/lora_rows.py) costs in mixed batches
bench-lora: $(STAMP) model
	@$(PY) -m bench.lora --data-dir $(DATA_DIR)

# Two accounts on one deployment, one flooding: the light one's TTFT with and without the
# gateway's queue (scripted workers; a real one too with WORKER=http://host:port, whose
# --max-num-seqs is SLOTS, default 4)
bench-tenancy: $(STAMP)
	@$(PY) -m bench.tenancy $(if $(WORKER),--worker $(WORKER),) $(if $(SLOTS),--worker-slots $(SLOTS),)

# Cache-aware routing over two or more running workers: WORKERS=http://a,http://b and
# What one account can do to another (bench/hostile.py); BEFORE=<checkout>: that tree too
bench-hostile: $(STAMP)
	@$(PY) -m bench.hostile
	@$(if $(BEFORE),$(PY) -m bench.hostile --src $(BEFORE),true)

# The seam of a stream continued on another worker, over two real workers (bench/seam.py)
bench-seam: $(STAMP) model
	@$(PY) -m bench.seam

# KV_EVENTS=tcp://a:port,tcp://b:port (workers started with --kv-events-port); bench/affinity.py
bench-affinity: $(STAMP)
	@$(PY) -m bench.affinity --workers "$(WORKERS)" --kv-events "$(KV_EVENTS)"

# Batch beside interactive traffic: TTFT alone and with a 1,000-line job, the job's
# throughput, its cached share with and without prefix grouping (bench/batch.py)
bench-batch: $(STAMP) redis
	@$(PY) -m bench.batch

# The gateway's memory over 200,000 requests, without Redis and with it (bench/soak.py)
bench-soak: $(STAMP) redis
	@$(PY) -m bench.soak $(if $(REQUESTS),--requests $(REQUESTS),)

bench: bench-gateway bench-plugins

# Throughput with a compiled load generator (wrk) against the fast fake upstream: the gateway
# with one and two server processes beside vllm-router (bench/throughput.py)
bench-throughput: $(STAMP) $(ROUTER) redis
	@scripts/ensure-command.sh wrk wrk
	@$(PY) -m bench.throughput
