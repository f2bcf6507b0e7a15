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
STANDALONE := $(BUILD)/standalone
MODULE := notebooks/cnnbook/__init__.py
STYLE := notebooks/cnnbook/book.mplstyle

.DEFAULT_GOAL := help
.PHONY: help setup book test notebooks format cnnbook check-cnnbook figures lint nbval standalone \
	browser pdf bench robust clean

# PYTORCH=cpu installs PyTorch's CPU-only wheels (a few hundred MB) instead of the default ones,
# which on Linux bring several GB of CUDA libraries: `make test PYTORCH=cpu`. Set it on the
# first run (or after `rm -rf .venv`): an installed PyTorch is kept.
PYTORCH ?= default

# PyTorch's CPU threads (OpenMP) spin while they wait for each other. On a busy machine a
# spinning thread takes the core that the thread it waits for needs: a gradcheck on a tiny
# block took 46 s instead of 1.5 s with the other core loaded. Passive waiting sleeps instead.
export OMP_WAIT_POLICY ?= PASSIVE
CPU_WHEELS := https://download.pytorch.org/whl/cpu

help: ## List the targets
	@echo "The CNN Blocks Book"
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# The environment is (re)installed when it is missing or requirements.txt is newer than it.
# The book's module is installed editable, so the chapters import it from any folder.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(if $(filter cpu,$(PYTORCH)),$(PYTHON) -m pip install --quiet --disable-pip-version-check \
		--index-url $(CPU_WHEELS) $$(grep -E '^(torch|torchvision)\b' requirements.txt))
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	cp requirements.txt $@

setup: $(STAMP) ## Create .venv and install requirements.txt into it (when missing or stale)

notebooks: $(STAMP) ## Write notebooks/*.ipynb afresh from the MyST sources (.md)
	$(VENV)/bin/jupytext --quiet --to ipynb $(CHAPTERS)

# JupyterLab refuses a chapter whose .md is not in the form Jupytext writes once its .ipynb is
# newer; tests/test_jupyter.py fails on such a chapter, and this rewrites it in that form.
format: $(STAMP) ## Rewrite the chapters' .md in Jupytext's own form (metadata, spacing)
	mkdir -p $(BUILD)
	for chapter in $(CHAPTERS); do $(VENV)/bin/jupytext --quiet --to ipynb -o $(BUILD)/format.ipynb $$chapter \
		&& $(VENV)/bin/jupytext --quiet --to md:myst -o $$chapter $(BUILD)/format.ipynb; done

cnnbook: $(STAMP) ## Regenerate the module cnnbook from the chapters' #@save cells
	$(PYTHON) tools/save.py

check-cnnbook: $(STAMP) ## Fail if the module cnnbook is out of sync with the chapters
	$(PYTHON) tools/save.py --check

$(FIGURES_STAMP): $(STAMP) $(FIGURE_SCRIPTS) $(STYLE)
	$(PYTHON) figures/make_figures.py
	touch $@

figures: $(FIGURES_STAMP) ## Draw the diagrams in figures/ from their scripts

# The .ipynb are named: ruff skips files that .gitignore lists when it walks a folder.
lint: notebooks ## Lint the chapters' code (84 columns), the saved module and the tools with ruff
	$(VENV)/bin/ruff check $(NOTEBOOKS) notebooks tools figures $(wildcard tests)

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

# nbval runs each chapter as a reader who downloaded only its .ipynb runs it: alone in an empty
# folder, with the book's module installed (the book build runs them from notebooks/).
standalone: notebooks
	rm -rf $(STANDALONE)
	for notebook in $(NOTEBOOKS); do mkdir -p $(STANDALONE)/$$(basename $$notebook .ipynb); \
		cp $$notebook $(STANDALONE)/$$(basename $$notebook .ipynb)/; done

# The cell timeout guards against a hang, not a budget: run beside the other tests, the
# longest cell (the comparison's study) took about a minute.
NBVAL := -p no:cacheprovider --nbval-lax --nbval-cell-timeout=300 $(STANDALONE)/*/*.ipynb
# The book build runs the chapters with the default seed and this machine's kernels; nbval
# runs them again under another seed and MKL's and oneDNN's portable kernels, so every run of
# the tests checks two configurations (book/running.md, "Two kinds of check").
NBVAL_ENV := CNNBOOK_SEED=1 MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=AVX2

# pytest runs on TEST_WORKERS processes (pytest-xdist; 0 runs it in one). Each takes a whole
# test module or notebook at a time (--dist loadscope), since nbval runs a notebook's cells in
# order in one kernel; in the order given (--no-loadscope-reorder), so that the longest
# module, tests/test_devices.py, starts first rather than last. The book build stays serial:
# the timings it measures are printed in the book.
TEST_WORKERS ?= 2
PARALLEL := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder)

nbval: standalone ## Run every chapter with nbval, each in a fresh kernel and an empty folder, two at a time
	$(NBVAL_ENV) $(PYTHON) -m pytest $(PARALLEL) $(NBVAL)

# Not part of `make test`: the whole matrix takes 30 to 40 minutes on two cores.
# CHAPTERS_ROBUST=senet and CONFIGS=seed-1 narrow it down.
robust: $(STAMP) ## Run every chapter under seeds 0-4, one thread and other CPU kernels
	$(PYTHON) tools/robust.py --report $(BUILD)/robust.txt \
		$(if $(CHAPTERS_ROBUST),--chapters $(CHAPTERS_ROBUST)) $(if $(CONFIGS),--configs $(CONFIGS))

# tests/test_pages.py drives a Chromium: the system's when there is one (CI installs Debian's
# `chromium`), else Playwright's own, downloaded once into ~/.cache/ms-playwright.
browser: $(STAMP) ## Find a Chromium for the page tests, or install Playwright's own
	@$(PYTHON) tests/chromium.py || { echo "No Chromium found: installing Playwright's own"; \
		$(PYTHON) -m playwright install chromium; }

# The PDF prints the chapters the last `make book` executed (its cache): it never runs them.
pdf: $(STAMP) browser ## Print the book into _build/pdf/cnn-blocks-book.pdf (after make book)
	$(PYTHON) tools/pdf.py

test: lint check-cnnbook book browser standalone pdf ## Lint, check the module, build strictly, run the chapters, open every page, read the PDF
	$(NBVAL_ENV) $(PYTHON) -m pytest $(PARALLEL) $(wildcard tests) $(NBVAL)

# Timings depend on the machine and take minutes, so `make test` does not run this. The table
# goes into the module (notebooks/cnnbook/benchmarks/), where the closing chapter reads it.
bench: $(STAMP) ## Time the book's networks against torchvision's and timm's (CPU, and GPU if any)
	$(PYTHON) tools/bench.py

clean: ## Remove the build (with its screenshots), the generated notebooks and figures (keeps .venv)
	rm -rf $(BUILD) $(NOTEBOOKS) $(FIGURES_STAMP) figures/*.svg .pytest_cache
