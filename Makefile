# Pathology curation workbench. Quick start: `make demo` (install + run the demo), `make test` (install + tests).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/demo
DEMO_ARGS ?=
SWEEP ?= sweeps/demo.yml
SWEEP_ARGS ?=
# Debian packages for the napari/Qt tests (virtual display with OpenGL through Mesa, Qt's xcb plugin)
APT_PACKAGES := xvfb xauth libgl1-mesa-dri libegl1 libglx-mesa0 libdbus-1-3 libfontconfig1 libxkbcommon-x11-0 \
	libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 \
	libxcb-xfixes0 libxcb-shape0 libxcb-cursor0
# Debian's Chromium and its WebDriver for the JupyterLab browser tests (nothing downloads a browser at run time)
BROWSER_PACKAGES := chromium chromium-driver fonts-dejavu-core

.PHONY: setup system-deps browser-deps demo test test-all test-ui screenshots reliability benchmarks sweep strip-notebooks clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(MAKE) --no-print-directory system-deps browser-deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $@

# Installs the display packages when run as root on Debian/Ubuntu; otherwise says what to install.
system-deps:
	@if command -v Xvfb >/dev/null && [ -e /usr/lib/x86_64-linux-gnu/libxcb-icccm.so.4 -o -e /usr/lib/aarch64-linux-gnu/libxcb-icccm.so.4 ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing display packages for the napari tests: $(APT_PACKAGES)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	else \
		echo "note: napari tests need a virtual display; install: $(APT_PACKAGES)"; \
	fi

# Installs Chromium and chromedriver (Debian packages) when run as root; otherwise says what to install.
browser-deps:
	@if command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing the browser for the JupyterLab tests: $(BROWSER_PACKAGES)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(BROWSER_PACKAGES) >/dev/null; \
	else \
		echo "note: the JupyterLab browser tests need: $(BROWSER_PACKAGES)"; \
	fi

demo: setup
	$(BIN)/python -m workbench.runs.demo --run-dir $(RUN_DIR) $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -o addopts='--strict-markers'

# The interfaces where users meet them: notebook widgets in JupyterLab driven by headless Chromium (slow tier),
# the napari plugin under Xvfb, the widget logic.
UI_TESTS := tests/test_browser.py tests/test_napari.py tests/test_widgets.py
test-ui: setup
	$(BIN)/python -m pytest -q -o addopts='--strict-markers' $(UI_TESTS)

# Regenerates the README's pictures (docs/img/*.png) from the browser and napari tests.
screenshots: setup
	WORKBENCH_SCREENSHOTS=$(CURDIR)/docs/img $(BIN)/python -m pytest -q -o addopts='--strict-markers' \
		tests/test_browser.py tests/test_napari.py -k 'jupyterlab or add_plugin_dock_widget'

reliability: setup
	$(BIN)/python -m pytest -q -o addopts='--strict-markers' -rA tests/test_reliability.py tests/test_hostile.py

sweep: setup
	$(BIN)/python -m workbench.runs.sweep $(SWEEP) --out runs/$(basename $(notdir $(SWEEP))) $(SWEEP_ARGS)

# Every benchmarks/*.py; each script's last JSON line goes to benchmarks/results/quick/NAME.json (quick sizes),
# or with BENCH_FULL=1 (full sizes) to benchmarks/results/NAME.json, the committed figures (benchmarks/_results.py).
# The scale benchmarks (search_scale, assign_scale) run at 10^5 rows (quick) or 10^6 (BENCH_FULL=1) into
# benchmarks/results/quick/; their committed 10^7-row figures come only from `make benchmarks SCALE=1`
# (needs ~8 GB free under /tmp for the shared 10^7 x 384 float16 array, written once in ~2.5 min).
# Times measured on the shared 2-core machine (load 6-12): search_scale ~70 min at 10^7 (array 2.5 min, its raw
# re-rank copy 2 min, exact truth 6 min, index builds 1.5 + 9 + 30 min for the 10^5/10^6/10^7 curve, query
# sweeps ~2 min per size; with --cache DIR a rerun loads the saved indexes and truth: ~10 min);
# assign_scale ~5 min at 10^7 on a quiet machine, ~15 min at load 7 (1 worker + 2 workers + the
# single-process check on 500k rows). e.g. `make benchmarks SCALE=1 BENCHMARKS="search_scale assign_scale"`.
SCALE ?=
benchmarks: setup
	BENCH_SCALE=$(SCALE) $(BIN)/python benchmarks/_results.py $(BENCHMARKS)

strip-notebooks:
	$(BIN)/python -m workbench.runs.notebooks strip notebooks/*.ipynb

clean:
	rm -rf runs data/demo
