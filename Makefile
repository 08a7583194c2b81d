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

# `make run`: the README's main job, Bridge on the exact world with its shipped trained denoiser (prior=learned, 16 px):
# a network's behaviour, as Stable Diffusion's, with exact metrics. `python run.py` alone uses the closed form (32 px).
run: $(STAMP)
	$(PY) run.py prior=learned

# `make test`: everything but the slow science checks (12-18 min on 2 cores); CI also runs `make test-slow` (50-61 min).
test: $(STAMP)
	$(PY) -m pytest tests -m "not slow" --durations=20

test-slow: $(STAMP)
	$(PY) -m pytest tests -m slow --durations=20

test-all: $(STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf outputs multirun .pytest_cache
