# loraplex: an OpenAI-compatible multi-LoRA server for one NF4 Llama-family model on one GPU.
#
#   docker build -t loraplex .
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro loraplex \
#       --host 0.0.0.0 --port 8000 --model /models/base --adapter-root /models/adapters
#
# deploy/compose.yaml runs it with Prometheus and Grafana.

# The CUDA "base" flavour: Ubuntu 24.04 plus the CUDA 12.9 runtime stub and the NVIDIA container
# settings (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES, the driver requirement check).
# The "runtime" flavour would add cuBLAS/cuDNN/NCCL a second time: the PyTorch CUDA wheel below
# ships its own (as nvidia-* packages), matched to its build.
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-base-ubuntu24.04
FROM ${CUDA_IMAGE}

# torch 2.13.0 is the version README.md installs and CI tests (pyproject allows >=2.5,<2.14).
# cu129 is its newest CUDA 12.x build (2.13.0's CUDA builds: cu126, cu129, cu130, cu132), with
# Hopper and Blackwell kernels; it wants an R575+ driver. For older drivers build the cu126
# variant: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
# --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu129

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.12 (Ubuntu 24.04's). gcc, libc6-dev and python3-dev are not build leftovers: Triton
# compiles a small C launcher for its kernels at run time (it fails with "Failed to find C
# compiler" or "Python.h: No such file" without them).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment: Ubuntu 24.04's system Python refuses pip installs (PEP 668).
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from PyTorch's CUDA 12.9 index (with the triton and nvidia-* wheels it pins), in
# its own layer: it is most of the image and changes least often.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# Then the package; pip keeps the torch above (it satisfies pyproject's range) and takes the
# rest (transformers, bitsandbytes, fastapi, uvicorn, prometheus-client, ...) from PyPI.
WORKDIR /build
COPY pyproject.toml README.md ./
COPY loraplex ./loraplex
RUN pip install . && rm -rf /build

# Deployments written for vLLM run `vllm serve MODEL ...` (KServe's LLMInferenceService template
# does): in this image that command is `loraplex serve`, which takes vLLM's command lines (README,
# "Coming from vLLM"). Only here, not as a pip script: it must not shadow a real vLLM elsewhere.
RUN printf '#!/bin/sh\n# vLLM command lines, served by loraplex\nexec loraplex "$@"\n' > /opt/venv/bin/vllm \
    && chmod 755 /opt/venv/bin/vllm

# A non-root user with a home: Triton's kernel cache (~/.triton) and loraplex's measured kernel
# plans (~/.cache/loraplex) live there; compose.yaml keeps ~/.cache on a volume.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin loraplex \
    && mkdir -p /home/loraplex/.cache \
    && chown -R loraplex:loraplex /home/loraplex/.cache
ENV TRITON_CACHE_DIR=/home/loraplex/.cache/triton
USER loraplex
WORKDIR /home/loraplex

EXPOSE 8000

# Liveness: /health answers as soon as the server is up, also while the model loads (use
# /ready, 200 once the model can serve, for readiness, e.g. a Kubernetes readinessProbe).
# Python's urllib, so no curl in the image; a non-2xx answer or no answer raises -> exit 1.
# It assumes the default --port 8000 of CMD below.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# Every interface, also when a deployment's own arguments replace CMD (vLLM's default is every
# interface, so vLLM manifests pass no --host); a --host flag still wins.
ENV LORAPLEX_HOST=0.0.0.0

# Flags can also come from LORAPLEX_* environment variables (LORAPLEX_MODEL, LORAPLEX_API_KEY,
# LORAPLEX_ADMIN_KEY, ...; see `loraplex serve --help`); secrets are better passed that way.
# Without --model the bundled tiny demo model is served. Arguments to `docker run` replace CMD.
ENTRYPOINT ["loraplex", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
