# recipe-runner: one recipe in git is the whole truth of a run.
# `make demo` and `make test` create the virtual environment when it is missing.

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# The local CPU wheel on dev/CI machines; a bare torch range would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
RUN_DIR    ?= runs/tiny-dpo

.PHONY: venv test test-xla demo clean help

help:
	@echo "make demo   - train the tiny DPO recipe on CPU, export it, write its report"
	@echo "make test   - run the test suite"
	@echo "make build push [REGISTRY=...] - the image on the Neuron DLC (ECR login when needed)"
	@echo "make render - recipes -> helm/recipes and k8s/<recipe>/ manifests"
	@echo "make lint   - helm lint, hadolint, kubernetes-validate;  make tools - helm + kubectl into .tools/bin"
	@echo "make test-xla - the xla backend on torch-xla's CPU device (own venv .venv-xla, ~7 GB)"

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
	@echo "metrics: $(RUN_DIR)/metrics.jsonl | TensorBoard: $(RUN_DIR)/tensorboard | checkpoints: $(RUN_DIR)/checkpoints | exported model: $(RUN_DIR)/export-hf | report: $(RUN_DIR)/report/report.md"

# The xla backend's tests run in their own venv: torch 2.9 + torch-xla 2.9 (the Neuron DLC's
# versions) next to the main venv's newer torch. From PyPI, x86_64 torch 2.9 pulls CUDA wheels (~7 GB).
XLA_VENV   ?= .venv-xla
XLA_BIN    := $(XLA_VENV)/bin
XLA_TORCH  ?= torch==2.9.1 torch-xla==2.9.0
XLA_DEPS   ?= transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 datasets==5.2.0 pydantic==2.14.4 \
              omegaconf==2.4.0 "pyyaml>=6" "tqdm>=4.66" tensorboard==2.21.0 "filelock>=3.12" "jinja2>=3.1" \
              huggingface_hub==2.4.0 "requests>=2.31" "pytest>=8"

$(XLA_BIN)/.installed: pyproject.toml
	test -x $(XLA_BIN)/python || $(PYTHON) -m venv $(XLA_VENV)
	$(XLA_BIN)/python -m pip install -q --upgrade pip
	$(XLA_BIN)/python -m pip install -q $(XLA_TORCH)
	$(XLA_BIN)/python -m pip install -q -e . --no-deps
	$(XLA_BIN)/python -m pip install -q $(XLA_TORCH) $(XLA_DEPS)
	touch $@

test-xla: $(XLA_BIN)/.installed
	PJRT_DEVICE=CPU $(XLA_BIN)/python -m pytest -q -ra tests/test_xla*.py

clean:
	rm -rf runs build dist .pytest_cache

# ---------------------------------------------------------------- delivery: image, chart, manifests
# make build [REGISTRY=111122223333.dkr.ecr.us-east-1.amazonaws.com] [IMAGE=recipe-runner] [TAG=...]
IMAGE          ?= recipe-runner
REGISTRY       ?=
TAG            ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
GIT_COMMIT     ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
BASE_TAG       ?= 2.9.0-neuronx-py312-sdk2.30.0-ubuntu24.04
BASE_DIGEST    ?=
IMAGE_REF      := $(if $(REGISTRY),$(REGISTRY)/)$(IMAGE):$(TAG)
LAST_IMAGE     := .cache/last-image
TOOLS_BIN      := .tools/bin
HELM           := $(TOOLS_BIN)/helm
INSTANCE_TYPE  ?= trn1.32xlarge
# `make render`: which recipes get the neuron profile and which the cpu (laptop) profile
NEURON_RECIPES ?= llama3-8b-dpo llama3-8b-orpo llama3.1-8b-dpo llama3.1-8b-orpo
CPU_RECIPES    ?= tiny-dpo tiny-orpo

.PHONY: build push render lint tools

build:
	docker build --build-arg GIT_COMMIT=$(GIT_COMMIT) --build-arg BASE_TAG=$(BASE_TAG) \
		$(if $(BASE_DIGEST),--build-arg BASE_DIGEST=$(BASE_DIGEST)) -t $(IMAGE_REF) .
	@mkdir -p $(dir $(LAST_IMAGE)) && echo $(IMAGE_REF) > $(LAST_IMAGE)
	@echo "built $(IMAGE_REF) (recorded in $(LAST_IMAGE) for make render)"

push:
	@test -n "$(REGISTRY)" || { echo "push: set REGISTRY=<account>.dkr.ecr.<region>.amazonaws.com (or another registry)"; exit 2; }
	@case "$(REGISTRY)" in *.dkr.ecr.*.amazonaws.com*) \
		region=$$(echo "$(REGISTRY)" | cut -d. -f4); \
		echo "ECR login ($$region)"; \
		aws ecr get-login-password --region $$region | docker login --username AWS --password-stdin $(firstword $(subst /, ,$(REGISTRY)));; \
	esac
	docker push $(IMAGE_REF)

tools: $(BIN)/.installed
	$(BIN)/python scripts/install_tools.py $(TOOLS_BIN)

render: $(BIN)/.installed tools
	$(BIN)/recipe-runner render $(NEURON_RECIPES:%=recipes/%.yaml) --profile neuron --instance-type $(INSTANCE_TYPE)
	$(BIN)/recipe-runner render $(CPU_RECIPES:%=recipes/%.yaml) --profile cpu

lint: $(BIN)/.installed tools
	$(HELM) lint --strict helm
	$(HELM) lint --strict helm --set recipe=tiny-dpo --set profile=cpu
	$(BIN)/hadolint Dockerfile
	$(BIN)/python -m kubernetes_validate --strict --quiet -k 1.29.0 k8s/*/manifests.yaml k8s/prerequisites/*.yaml
	$(BIN)/python -m kubernetes_validate --strict --quiet k8s/*/manifests.yaml k8s/prerequisites/*.yaml
	$(BIN)/recipe-runner render $(NEURON_RECIPES:%=recipes/%.yaml) --profile neuron --instance-type $(INSTANCE_TYPE) --check > /dev/null
	$(BIN)/recipe-runner render $(CPU_RECIPES:%=recipes/%.yaml) --profile cpu --check > /dev/null
