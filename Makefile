# The README's two commands: `make run` and `make test`. Everything they need installs here.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080
ADMIN_PASSWORD ?= secret
export HOST PORT

.PHONY: run test faults bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements.txt requirements-dev.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

run: $(VENV)/.installed
	@echo "changefeed: http://$(HOST):$(PORT)/  (embedded engine in $${DATA_DIR:-./data})"
	@echo "log in with Basic auth: admin / $(if $(filter secret,$(ADMIN_PASSWORD)),secret (set ADMIN_PASSWORD to change it),the ADMIN_PASSWORD you set)"
	@echo "try: curl -u admin:secret http://$(HOST):$(PORT)/"
	$(BIN)/gunicorn -c gunicorn.conf.py

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q

# The fault suite alone (it is part of `make test` too), printing its report rows.
faults: $(VENV)/.dev-installed
	ulimit -n 20000 2>/dev/null; $(BIN)/python -m pytest -q -s tests/test_faults.py tests/test_faults_storage.py tests/test_faults_shutdown.py tests/test_faults_memory.py

bench: $(VENV)/.dev-installed
	$(BIN)/pip install --quiet -r bench/requirements.txt
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	ulimit -n 20000 2>/dev/null; $(BIN)/python -m bench --peers

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) data .pytest_cache
