# Two entry points, each of which sets itself up on a fresh machine:
#   make demo   - the main job on its embedded default
#   make test   - the whole test suite (what CI runs)
PY := .venv/bin/python

# pip byte-compiles what it installs on one core; compileall does the same on every core, ~20 s less of a fresh 2-core
# machine's set-up. Like pip it leaves a file that does not compile for this Python (torch ships one written for 3.12)
# as source, hence the `|| true`.
COMPILE := $(PY) -m compileall -q -j 0 .venv/lib >/dev/null || true

# $(call install,FILE): FILE's packages into .venv. uv unpacks the wheels on every core: torch and its CUDA libraries
# (5.5 GB) with their bytecode in 35 s on a fresh 2-core machine, where pip took 68 s and compileall 12 more, a
# minute the demo's 15 then trains (BENCHMARKS.md "A fresh machine's first minute and a half"). It is told pip's own
# settings (tools/pip_settings.py: indexes, find-links, constraints) and, as pip does, takes the best version across
# the indexes, so both install the same versions. Where uv cannot be had, or fails, pip installs them as before.
install = .venv/bin/pip install -q uv && settings=$$($(PY) tools/pip_settings.py) && .venv/bin/uv pip install -q \
	--python $(PY) --no-cache --compile-bytecode --index-strategy unsafe-best-match $$settings -r $(1) || { \
	echo "uv did not install $(1): pip installs it"; \
	.venv/bin/pip install -q --no-compile -r $(1) && { $(COMPILE); }; }

.venv/.runtime: requirements.txt
	python3 -m venv .venv
	$(call install,requirements.txt)
	touch $@

.venv/.test: requirements.txt requirements-test.txt
	python3 -m venv .venv
	$(call install,requirements-test.txt)
	touch $@ .venv/.runtime

# when make started (expanded once, as make reads this file): the demo's 15 minutes count the venv's set-up too
DEMO_STARTED := $(shell date +%s)
demo: .venv/.runtime
	$(PY) demo.py --started=$(DEMO_STARTED)

# tests/test_serve.py drives the web page in a real headless browser: Debian's chromium, as root or through sudo
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# Two processes, each running whole test files (a file's fixtures stay in one process): most of the suite is
# single-threaded (process starts, imports, tracing), so the two cores share it. On this 2-core machine the run took
# 622 s against 697-780 s in one process (BENCHMARKS.md "The test suite on both cores").
test: .venv/.test chromium
	$(PY) -m pytest -q -n 2 --dist loadfile tests

.PHONY: demo test chromium
