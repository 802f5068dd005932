# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv on first use; `make lint` is the
# static check CI runs before the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install system-tools clean

$(BIN)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

install: $(BIN)/.installed system-tools

# Two OS programs the tests use, never downloaded by pip or Playwright: Debian's `chromium`, which the browser
# viewer's end-to-end test drives (Testing/test_viewer_browser.py), and `dciodvfy` from `dicom3tools`, which
# validates the DICOM export (Testing/test_dicom.py). Where one is missing, root (CI) apt-installs it; anyone else
# is told the command (the browser test then fails; the validator test skips).
CHROMIUM ?= /usr/bin/chromium
system-tools:
	@missing=""; \
	[ -x $(CHROMIUM) ] || missing="$$missing chromium"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else \
			echo "missing:$$missing; install with: sudo apt-get install$$missing"; \
		fi; \
	fi

demo: $(BIN)/.installed
	$(BIN)/brainanomaly demo -o demo_output

# One pytest-xdist worker per core, at most 4 (each builds its own copy of the session fixtures; the largest test
# process reached 3 GB); --dist loadfile keeps a file's tests, and so its module fixtures, on one worker.
# Testing/conftest.py splits the cores' threads between the workers.
test: $(BIN)/.installed system-tools
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile Testing

# ruff (pyflakes + pycodestyle errors) and lint-imports (layers, no import cycles): both configured in pyproject.toml.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf demo_output .pytest_cache
