# dnfer: `make demo` and `make test` set everything up on a fresh machine, then run.
# Installs are idempotent: stamp files depend on pyproject.toml, so a second run skips pip.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CORE   := $(VENV)/.dnfer-core
DEV    := $(VENV)/.dnfer-dev
# torch/torchvision are pinned to the releases this project is tested with.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install install-dev browser lint clean

# torch's x86_64 wheel is a CUDA build: with its NVIDIA libraries and triton the finished
# .venv is about 6.3 GiB. Checking first turns a half-installed venv and pip's "[Errno 28] No
# space left on device" into one line that says what is needed.
MIN_FREE_GIB ?= 7

$(VENV)/bin/python:
	@$(PYTHON) -c 'import shutil, sys; free = shutil.disk_usage(".").free / 2**30; need = float(sys.argv[1]); \
	  free >= need or sys.exit(f"make: only {free:.1f} GiB free on the disk holding $(CURDIR); creating $(VENV) with torch (a CUDA build) needs about {need:.10g} GiB. Free some space, or set MIN_FREE_GIB=<GiB> to override, and run make again.")' $(MIN_FREE_GIB)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The demo needs only the core dependencies; tests add the dev extras (ONNX, cleanlab, selenium...).
$(CORE): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	sha1sum pyproject.toml > $(CORE)

$(DEV): $(CORE)
	$(PY) -m pip install -q -e '.[dev]'
	sha1sum pyproject.toml > $(DEV)

install: $(CORE)
install-dev: $(DEV)

# Debian's chromium + chromedriver for the report's browser test (skipped loudly without them).
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "WARNING: could not install chromium/chromium-driver; the HTML report browser test will be skipped"; \
	  else echo "WARNING: chromium/chromium-driver missing and cannot apt-get here; the report browser test will be skipped"; fi; \
	fi

demo: install
	$(VENV)/bin/dnfer bench --config configs/demo_vs_ce.yaml --out runs/demo --jobs 2 --threads 1

test: install-dev browser
	$(PY) -m pytest -q

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
