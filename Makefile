# The two commands a newcomer runs: `make demo` (the main job) and `make test`.
# Both create .venv in the repo root when it is missing and install everything into it.
PY := .venv/bin/python
# torch and torchvision are pinned: these two releases install from the machine's local cache,
# any other pair downloads gigabytes.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test test-fast bench clean

venv: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[test]' $(TORCH_PINS)
	touch $@

demo: venv
	$(PY) -m vlm demo

# One pytest-xdist worker per core (eight at most: each holds torch and its fixtures); tests/conftest.py
# gives each worker its share of torch threads and builds the costly session fixtures once for all
# workers. `test-fast` leaves out the tests marked slow.
PYTEST := $(PY) -m pytest -q -n auto --maxprocesses 8

test: venv
	$(PYTEST) tests

test-fast: venv
	$(PYTEST) -m "not slow" tests

clean:
	rm -rf .venv
