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

# tests/test_serve.py drives the web page in a real headless browser: Debian's chromium, as root or through sudo
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: .venv/.test chromium
	$(PY) -m pytest -q tests

.PHONY: demo test chromium
