# Everything a fresh clone needs: python3 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
SOURCES := $(shell find metacenter console twisted -name '*.py' -o -name '*.json' 2>/dev/null) setup.py

.PHONY: run test test-node test-console bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# A regular (not editable) install: `pip install -e .` hides twisted/plugins
# from twistd.
$(STAMP): $(BIN)/python $(SOURCES)
	rm -rf build
	$(BIN)/pip install -q .
	@touch $@

$(TEST_STAMP): $(BIN)/python $(SOURCES)
	rm -rf build
	$(BIN)/pip install -q ".[test]"
	@touch $@ $(STAMP)

install: $(STAMP)

# ARGS go after the defaults and win over them (the last --listen counts):
#   make run ARGS="--listen tcp:8081:interface=127.0.0.1"   # a second node
# exec: twistd replaces the shell, so the SIGTERM or Ctrl-C that stops make
# reaches the node instead of leaving it running.
ARGS ?=
run: $(STAMP)
	cd /tmp && exec $(abspath $(BIN))/twistd --nodaemon --pidfile= metacenter --listen tcp:8080:interface=127.0.0.1 $(ARGS)

# The node's tests (pytest-twisted) and the console's (asyncio, Textual) run in
# separate processes: their event loops do not share one interpreter well.
test: $(TEST_STAMP)
	$(MAKE) --no-print-directory test-node
	$(MAKE) --no-print-directory test-console

test-node: $(TEST_STAMP)
	$(BIN)/python -m pytest tests -p no:cacheprovider -q

test-console: $(TEST_STAMP)
	$(BIN)/python -m pytest tests_console -p no:cacheprovider -q

bench: $(TEST_STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info
