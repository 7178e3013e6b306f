# Quick start: `make run` (app on the embedded minilm) and `make test`. Both create .venv when needed
# and build the compiled cpu kernel (the default kernel wherever it builds; a warning, not a failure,
# on a machine without a C++ compiler).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench kernels clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# Cheap when built (it loads the cached library); the build lands in torch's extension root
# (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), where the app and the tests look.
kernels: $(STAMP)
	$(PY) -m sam_viz build-kernels

# MALLOC_ARENA_MAX=2: Streamlit runs each script run in a thread, and glibc's per-thread malloc arenas
# kept what was freed: the server grew 12% over 200 analyses with the memory in use flat; with two
# arenas it did not (bench/memory_server.py). It must be set before the process starts.
run: kernels
	MALLOC_ARENA_MAX=2 HF_HUB_OFFLINE=1 $(PY) -m streamlit run app.py --browser.gatherUsageStats false

test: kernels
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

bench: kernels
	HF_HUB_OFFLINE=1 $(PY) -m bench.foundation

clean:
	rm -rf $(VENV) .pytest_cache
