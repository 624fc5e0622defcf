# syntax=docker/dockerfile:1
# The fine-tuning worker: `backbones worker` reads its spec from $BACKBONES_SPEC (set by
# `backbones render` / `backbones submit`) and writes its outputs to S3.
#
# Build and push (see docs/kubernetes.md):
#   docker build -t ghcr.io/backbones/backbones:0.1.0 .
#   docker push ghcr.io/backbones/backbones:0.1.0
#
# The base matches the torch pinned in pyproject.toml (2.14.1, CUDA 13.0, cuDNN 9), so pip
# keeps the base's CUDA build instead of downloading another. Pinned by tag here; in
# production pin the digest too (FROM pytorch/pytorch:<tag>@sha256:<digest>) so a re-pushed
# tag cannot change what trains.
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

# ---- build: a wheel of this repo, so no source tree or build tooling reaches the image ------
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# ---- runtime --------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
# pip reads PIP_INDEX_URL / PIP_EXTRA_INDEX_URL from the environment: a build may point them at
# a mirror (scripts/build_image_local.sh does, for a base without torch). Unset by default.
# Build args stay in the image's history: never put credentials in these URLs.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
LABEL org.opencontainers.image.title="backbones" \
      org.opencontainers.image.description="Fine-tune pretrained image backbones under one protocol" \
      org.opencontainers.image.source="https://github.com/backbones/backbones" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric user: the Job's securityContext (runAsNonRoot, runAsUser 10001) can then
# verify it without reading /etc/passwd.
RUN groupadd --gid 10001 backbones \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home --shell /usr/sbin/nologin backbones

# tini is PID 1 (ENTRYPOINT, and the Job's command): the kernel drops a SIGTERM sent to a PID 1
# without a handler, so a pod deleted while Python imports would run on until it is SIGKILLed.
# tini handles signals from its first instant, passes them on and reaps zombies. Its version is
# the base distribution's (one small package, no dependencies), so it is not pinned here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /dist /dist
# --no-cache-dir: no pip cache in the layer. On the default base torch/torchvision already
# satisfy the pins, so pip installs only the rest of the dependencies; on a plain Python base
# (scripts/build_image_local.sh) it installs the pinned torch and torchvision as well.
# The last three are the wavemix extra (WaveMix, the paper's eleventh backbone), pinned here.
RUN pip install --no-cache-dir /dist/*.whl wavemix==0.2.4 PyWavelets==1.8.0 einops==0.8.2 \
    && rm -rf /dist \
    && backbones --help >/dev/null

# Offline by default: weights come from S3 (safetensors). `render` sets it to 0 for specs that ask
# for weights: "timm". The dataset cache is an emptyDir mounted at /cache in the Job.
ENV HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BACKBONES_CACHE=/cache \
    MPLCONFIGDIR=/tmp/matplotlib

USER 10001:10001
WORKDIR /home/backbones
# Prometheus /metrics (metrics.port in the spec; the Job names this port "metrics").
EXPOSE 9108
ENTRYPOINT ["tini", "--", "backbones", "worker"]
