# recipe-runner: one recipe in git is the whole truth of a run.
# `make demo` and `make test` create the virtual environment when it is missing.

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# The local CPU wheel on dev/CI machines; a bare torch range would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
RUN_DIR    ?= runs/tiny-dpo

.PHONY: venv test demo clean help

help:
	@echo "make demo   - train the tiny DPO recipe on CPU, export it, write its report"
	@echo "make test   - run the test suite"

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

demo: $(BIN)/.installed
	$(BIN)/recipe-runner train recipes/tiny-dpo.yaml exp_manager.explicit_log_dir=$(RUN_DIR)
	$(BIN)/recipe-runner export $(RUN_DIR) --to hf $(RUN_DIR)/export-hf
	$(BIN)/recipe-runner report $(RUN_DIR)

clean:
	rm -rf runs build dist .pytest_cache
