# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv on first use; `make lint` is the
# static check CI runs before the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install clean

$(BIN)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/brainanomaly demo -o demo_output

# One pytest-xdist worker per core, at most 4 (each builds its own copy of the session fixtures; the largest test
# process reached 3 GB); --dist loadfile keeps a file's tests, and so its module fixtures, on one worker.
# Testing/conftest.py splits the cores' threads between the workers.
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile Testing

# ruff (pyflakes + pycodestyle errors) and lint-imports (layers, no import cycles): both configured in pyproject.toml.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf demo_output .pytest_cache
