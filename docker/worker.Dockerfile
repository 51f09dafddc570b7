# syntax=docker/dockerfile:1
# The worker and trainer: `likeness worker` by default, and every other `likeness`
# command (train-generator, train-extractor, weights ...) from the same image.
# CUDA comes with the torch wheels (the NVIDIA driver comes from the host through
# the NVIDIA Container Toolkit). Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t likeness-worker .
# CUDA 13.0 wheels need an NVIDIA driver >= 580; for an older driver pick another
# wheel index, e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LIKENESS_DATA_DIR=/data

RUN groupadd --system --gid 10001 likeness \
    && useradd --system --uid 10001 --gid likeness --create-home --home-dir /home/likeness likeness

# CUDA torch first, in a layer of its own: the largest and the least often changed.
# The versions are the [worker] pins of pyproject.toml (a test keeps them equal).
RUN pip install --index-url ${TORCH_INDEX_URL} torch==2.14.1 torchvision==0.29.1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY likeness/ likeness/
COPY app/ app/
COPY worker/ worker/
COPY cli/ cli/
COPY weights/ weights/
# Editable, so the package stays at /app beside weights/. The torch pins above
# already satisfy the extra, so this adds only the rest of it.
RUN pip install -e ".[worker]" \
    && mkdir -p /data /app/runs \
    && chown likeness:likeness /data /app/runs

USER likeness
CMD ["likeness", "worker"]
