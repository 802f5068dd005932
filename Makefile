# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv on first use; `make lint` is the
# static check CI runs before the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install browser clean

$(BIN)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

install: $(BIN)/.installed browser

# The browser viewer's end-to-end test (Testing/test_viewer_browser.py) drives the OS's Chromium through Playwright;
# no browser is ever downloaded by Playwright. Where /usr/bin/chromium is missing, root (CI) apt-installs Debian's
# `chromium`; anyone else is told the command, and that test fails until it is there.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else \
			echo "$(CHROMIUM) is missing: run 'sudo apt-get install chromium' for the viewer's browser test"; \
		fi; \
	fi

demo: $(BIN)/.installed
	$(BIN)/brainanomaly demo -o demo_output

# One pytest-xdist worker per core, at most 4 (each builds its own copy of the session fixtures; the largest test
# process reached 3 GB); --dist loadfile keeps a file's tests, and so its module fixtures, on one worker.
# Testing/conftest.py splits the cores' threads between the workers.
test: $(BIN)/.installed browser
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile Testing

# ruff (pyflakes + pycodestyle errors) and lint-imports (layers, no import cycles): both configured in pyproject.toml.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf demo_output .pytest_cache
