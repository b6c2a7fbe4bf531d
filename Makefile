# The two commands of the README: `make run` opens the app, `make test` runs the suite.
VENV ?= .venv
XVFB := xvfb-run -a -s "-screen 0 1280x1024x24"
# ruff, then mypy (which files, and which strictly: [tool.mypy] in pyproject.toml)
LINT := $(VENV)/bin/ruff check pcl_viewer plugins tests && $(VENV)/bin/mypy

.PHONY: setup setup-test run test lint priors screenshots domain
setup:
	@bash scripts/setup.sh

# the tests also need Chromium (HTML report screenshots); the app does not
setup-test:
	@SETUP_TEST=1 bash scripts/setup.sh

# Without a display (no DISPLAY / WAYLAND_DISPLAY) say so in one line instead of letting
# Qt abort; `make run XVFB_RUN=1` runs the app under Xvfb (e.g. with --screenshot).
run: setup
	@if [ -z "$$DISPLAY$$WAYLAND_DISPLAY" ] && [ -z "$(XVFB_RUN)" ]; then \
	  echo "make run: no display (DISPLAY and WAYLAND_DISPLAY unset); run it on a desktop, over ssh -X, or as 'make run XVFB_RUN=1 ARGS=\"--screenshot out.png\"'"; exit 1; fi
	$(if $(XVFB_RUN),$(XVFB) )$(VENV)/bin/pcl-viewer $(ARGS)

# the lint first (seconds), then the suite; CI runs exactly this
test: setup-test
	$(LINT)
	QT_API=pyside6 $(XVFB) $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# the app's screenshots in docs/figures (the default window after Run all, linked CHRO-map)
screenshots: setup
	QT_API=pyside6 $(XVFB) $(VENV)/bin/python -m pcl_viewer_napari.screenshots docs/figures

# re-calibrate the domain check for the shipped bundles (run after replacing them)
domain: setup
	$(VENV)/bin/pcl domain calibrate --cf-bundle cf-cpu --seg-bundle seg-cpu --n 200 --seed 7919 --out resources/models/domain.json

lint: setup
	$(LINT)

priors: setup
	$(VENV)/bin/pip install -q --no-deps torchxrayvision
	$(VENV)/bin/pcl phantom priors
