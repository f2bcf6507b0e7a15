# The CNN Blocks Book. `make book` builds the HTML book, `make test` runs every check; both set
# up their own virtual environment on a fresh clone. `make` alone lists the targets.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.txt
BUILD := _build
CHAPTERS := $(wildcard notebooks/*.md)
NOTEBOOKS := $(CHAPTERS:.md=.ipynb)
FIGURE_SCRIPTS := $(wildcard figures/*.py)
FIGURES_STAMP := figures/.generated
MODULE := notebooks/cnnbook/__init__.py
STYLE := notebooks/cnnbook/book.mplstyle

.DEFAULT_GOAL := help
.PHONY: help setup book test notebooks cnnbook check-cnnbook figures lint nbval browser clean

help: ## List the targets
	@echo "The CNN Blocks Book"
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# The environment is (re)installed when it is missing or requirements.txt is newer than it.
$(STAMP): requirements.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	cp requirements.txt $@

setup: $(STAMP) ## Create .venv and install requirements.txt into it (when missing or stale)

notebooks: $(STAMP) ## Write notebooks/*.ipynb afresh from the MyST sources (.md)
	$(VENV)/bin/jupytext --quiet --to ipynb $(CHAPTERS)

cnnbook: $(STAMP) ## Regenerate the module cnnbook from the chapters' #@save cells
	$(PYTHON) tools/save.py

check-cnnbook: $(STAMP) ## Fail if the module cnnbook is out of sync with the chapters
	$(PYTHON) tools/save.py --check

$(FIGURES_STAMP): $(STAMP) $(FIGURE_SCRIPTS) $(STYLE)
	$(PYTHON) figures/make_figures.py
	touch $@

figures: $(FIGURES_STAMP) ## Draw the diagrams in figures/ from their scripts

lint: notebooks ## Lint the chapters' code, the saved module and the tools with ruff
	$(VENV)/bin/ruff check notebooks tools figures $(wildcard tests)

book: $(STAMP) figures ## Build the HTML book into _build/html (warnings are errors)
	$(PYTHON) tools/save.py
	@# The execution cache keys on a chapter's own cells; what the chapters import (cnnbook)
	@# or draw with (the plot style) changes their outputs too: a change to either re-executes them.
	@inputs=$$(cat $(MODULE) $(STYLE) requirements.txt | sha256sum); \
	if [ "$$(cat $(BUILD)/.execution-inputs 2>/dev/null)" != "$$inputs" ]; then \
		rm -rf $(BUILD)/.jupyter_cache $(BUILD)/.doctrees/environment.pickle; mkdir -p $(BUILD); echo "$$inputs" > $(BUILD)/.execution-inputs; \
	fi
	@# Sphinx saves its environment before it reports warnings, so a rebuild after a failed build
	@# would find nothing out of date and pass: forget the environment when the build fails.
	$(VENV)/bin/jupyter-book build . --warningiserror --nitpick --keep-going --builder html \
		|| { rm -f $(BUILD)/.doctrees/environment.pickle; exit 1; }

nbval: notebooks ## Run every chapter with nbval
	$(PYTHON) -m pytest -p no:cacheprovider --nbval-lax --nbval-cell-timeout=120 $(NOTEBOOKS)

# tests/test_pages.py drives a Chromium: the system's when there is one (CI installs Debian's
# `chromium`), else Playwright's own, downloaded once into ~/.cache/ms-playwright.
browser: $(STAMP) ## Find a Chromium for the page tests, or install Playwright's own
	@$(PYTHON) tests/chromium.py || { echo "No Chromium found: installing Playwright's own"; \
		$(PYTHON) -m playwright install chromium; }

test: lint check-cnnbook book browser ## Lint, check the saved module, build strictly, run the chapters and open every page in Chromium
	$(PYTHON) -m pytest -p no:cacheprovider --nbval-lax --nbval-cell-timeout=120 $(NOTEBOOKS) $(wildcard tests)

clean: ## Remove the build (with its screenshots), the generated notebooks and figures (keeps .venv)
	rm -rf $(BUILD) $(NOTEBOOKS) $(FIGURES_STAMP) figures/*.svg .pytest_cache
