# Two entry points, each of which sets itself up on a fresh machine:
#   make demo   - the main job on its embedded default
#   make test   - the whole test suite (what CI runs)
PY := .venv/bin/python

.venv/.runtime: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch $@

.venv/.test: requirements.txt requirements-test.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements-test.txt
	touch $@ .venv/.runtime

demo: .venv/.runtime
	$(PY) demo.py

test: .venv/.test
	$(PY) -m pytest -q tests

.PHONY: demo test
