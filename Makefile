# sdbridge: `make install` then `make run` / `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

STAMP  := $(VENV)/.installed

.PHONY: install run test test-slow test-all clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) run.py

# `make test`: everything but the slow science checks (11-13 min on 2 cores); CI also runs `make test-slow` (~27 min).
test: $(STAMP)
	$(PY) -m pytest tests -m "not slow" --durations=20

test-slow: $(STAMP)
	$(PY) -m pytest tests -m slow --durations=20

test-all: $(STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf outputs multirun .pytest_cache
