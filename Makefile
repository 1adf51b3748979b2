# All set-up happens here: `make demo` and `make test` work on a fresh clone.
# Stamps install only what their targets need into the same .venv (a bigger one covers the smaller ones):
#   demo: the library, the `lumos` command and the sample photos (core + samples extra), nothing else;
#   app:  the same + Streamlit;
#   test (and lint, bench, install): everything (trackers, Captum/torchcam references, Playwright, ruff,
#         import-linter) and Debian's chromium for the browser test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -qq --disable-pip-version-check
# Dev/test torch: 2.14.1 + torchvision 0.29.1 (both on this machine's disk; torchvision cannot import beside
# the 2.13.0 CPU wheel). demo/app take the small 2.13.0 CPU wheel only when no torch is installed yet.
TORCH := torch==2.14.1 torchvision==0.29.1
DEMO_TORCH := $(PY) -c 'import torch' 2>/dev/null || $(PIP) torch==2.13.0
DEMO_STAMP := $(VENV)/.installed-demo
APP_STAMP := $(VENV)/.installed-app
STAMP := $(VENV)/.installed

.PHONY: demo test install bench lint clean app

$(DEMO_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(DEMO_TORCH)
	$(PIP) -e '.[samples]'
	touch $(DEMO_STAMP)

$(APP_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(DEMO_TORCH)
	$(PIP) -e '.[app]'
	touch $(DEMO_STAMP) $(APP_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH) -e '.[dev]'
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	touch $(DEMO_STAMP) $(APP_STAMP) $(STAMP)

install: $(STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/lumos demo --out out

test: $(STAMP) lint
	$(PY) -m pytest -n 2 --dist loadscope

app: $(APP_STAMP)
	$(VENV)/bin/lumos app $(if $(MODEL),--model $(MODEL)) $(if $(PORT),--port $(PORT))

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) out .pytest_cache
