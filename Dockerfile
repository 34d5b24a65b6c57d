# recipe-runner on the AWS Neuron deep learning container (torch, torch-xla, neuronx-cc, NxD,
# EFA, OpenMPI, awscli). Build with `make build` (sets GIT_COMMIT and the tag).
#
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t recipe-runner:dev .
#   pin the base by digest:  --build-arg BASE_DIGEST=sha256:<64 hex>
ARG BASE_IMAGE=public.ecr.aws/neuron/pytorch-training-neuronx
ARG BASE_TAG=2.9.0-neuronx-py312-sdk2.30.0-ubuntu24.04
ARG BASE_DIGEST=""
FROM ${BASE_IMAGE}:${BASE_TAG}${BASE_DIGEST:+@}${BASE_DIGEST}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/recipe-runner

# Dependencies and code: installed with the image's torch/torch-xla/Neuron packages kept
# (docker/install.sh pins them to their installed versions and checks they did not change).
COPY pyproject.toml README.md ./
COPY src ./src
COPY docker/install.sh ./docker/install.sh
RUN bash docker/install.sh /opt/recipe-runner

# The recipes of this commit, for `recipe-runner train recipes/...` inside the image; the chart
# mounts the chosen recipe at /recipes.
COPY recipes ./recipes

# Non-root: the Neuron device plugin passes /dev/neuron* into the container and the Neuron driver
# makes those nodes usable by any user, so training does not need root. uid 1000 is the chart's
# default runAsUser (Ubuntu 24.04 images already have a uid-1000 user; reuse it if so).
RUN if ! getent passwd 1000 >/dev/null; then useradd --uid 1000 --create-home --shell /bin/bash runner; fi \
    && mkdir -p /shared && chown 1000:1000 /shared

ARG GIT_COMMIT=unknown
ENV RECIPE_RUNNER_GIT_COMMIT=${GIT_COMMIT}
RUN echo "${GIT_COMMIT}" > /opt/recipe-runner/GIT_COMMIT

USER 1000
ENTRYPOINT ["recipe-runner"]
CMD ["--help"]
