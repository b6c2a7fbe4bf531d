# The two commands of the README: `make run` opens the app, `make test` runs the suite.
VENV ?= .venv
XVFB := xvfb-run -a -s "-screen 0 1280x1024x24"

.PHONY: setup run test lint priors
setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/pcl-viewer $(ARGS)

test: setup
	QT_API=pyside6 $(XVFB) $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check pcl_viewer plugins tests

priors: setup
	$(VENV)/bin/pip install -q --no-deps torchxrayvision
	$(VENV)/bin/pcl phantom priors
