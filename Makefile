# ctprep + cttrain. The two commands a user needs: `make demo` and `make test`.
# Each target installs what it needs first, so on a fresh machine it is the whole set-up.

PYTHON ?= python3
# Text files are UTF-8 whatever the locale (summaries hold "±").
export PYTHONUTF8 := 1
VENV   ?= .venv
BIN    := $(VENV)/bin
# The stamp is keyed by pyproject.toml: editing the dependencies re-runs the install.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

DEMO_RAW   := data/raw/demo
DEMO_STORE := data/cache/demo.zarr
DEMO_RUN   := data/runs/demo
DEMO_CFG   := configs/demo.yaml
# The demo renders all 18 findings (the report shows which ones the CPU recipe learns and which it
# does not, each beside the floor); DEMO_LABELS="A,B" renders a subset.
DEMO_LABELS ?=

.PHONY: install demo test test-all bench bench-quick lint clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

DEMO_LABELS_CSV := $(DEMO_RAW)/multi_abnormality_labels/train_predicted_labels.csv

# Synthesize once: the data is deterministic, and regenerating it would only touch every file.
$(DEMO_LABELS_CSV): | $(STAMP)
	$(BIN)/ctprep synth $(DEMO_RAW) --patients 100 --seed 0 $(if $(DEMO_LABELS),--labels "$(DEMO_LABELS)")

# Every step below resumes: a second `make demo` redoes nothing that is finished.
demo: install $(DEMO_LABELS_CSV)
	$(BIN)/ctprep build-cache --data-dir $(DEMO_RAW) --labels $(DEMO_LABELS_CSV) \
		--metadata $(DEMO_RAW)/metadata/train_metadata.csv \
		--out $(DEMO_STORE) --config $(DEMO_CFG) --workers 2
	$(BIN)/ctprep make-folds $(DEMO_STORE) --folds 5 --config $(DEMO_CFG)
	$(BIN)/cttrain cv --config $(DEMO_CFG) --cache $(DEMO_STORE) --folds 5 --out $(DEMO_RUN) --resume
	$(BIN)/cttrain report $(DEMO_RUN)
	@echo "demo done: summary in $(DEMO_RUN)/results/cv_summary.json, figures in $(DEMO_RUN)/report/"

test: install
	$(BIN)/python -m pytest -q

# The long end-to-end tests too (marked slow).
test-all: install
	$(BIN)/python -m pytest -q -m "slow or not slow"

# The full benchmarks (the numbers BENCHMARKS.md reports); bench-quick is a start-up-bound smoke run.
bench: install
	$(BIN)/python bench/run_all.py

bench-quick: install
	$(BIN)/python bench/run_all.py --quick

lint: install
	$(BIN)/ruff check ctprep cttrain tests bench

clean-demo:
	rm -rf $(DEMO_RAW) $(DEMO_STORE) $(DEMO_STORE).lock $(DEMO_STORE).failures.json $(DEMO_STORE).folds.json $(DEMO_RUN)
