# make run / make test work on a fresh clone: they create .venv and install with constraints.txt.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= configs/default.toml
ARGS   ?=

.PHONY: install run test test-slow bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedkd run $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow" $(ARGS)

# tests marked slow: real deployments that wait on Flower's timers (a SuperNode killed and restarted: minutes) and
# strategies on Flower's own simulation engine (one such run stays in make test: test_federation.py)
test-slow: $(STAMP)
	$(PY) -m pytest -q tests -m slow $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/throughput.py --quick

clean:
	rm -rf runs .pytest_cache
