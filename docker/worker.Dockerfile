# The worker and trainer: `likeness worker` by default, and every other `likeness`
# command (train-generator, train-extractor, weights ...) from the same image.
# CUDA comes with the torch wheels (the NVIDIA driver comes from the host through
# the NVIDIA Container Toolkit). Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t likeness-worker .
# CUDA 13.0 wheels need an NVIDIA driver >= 580; for an older driver pick another
# wheel index, e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128.
# Where the PyTorch index cannot be reached, PyPI's torch wheels are CUDA 13.0 builds
# too: --build-arg TORCH_INDEX_URL=https://pypi.org/simple.
# PYTHON_IMAGE names the base image; where no registry can be reached,
# docker/base-images.sh builds a stand-in from Debian's packages and names it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

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
# The rest of the [worker] dependencies in a layer that only pyproject.toml invalidates
# (see api.Dockerfile). The torch pins above already satisfy the extra.
# onnxruntime-gpu replaces the core dependency's onnxruntime (both own the same
# module): the ONNX face detector then runs on the CUDA provider where a GPU is
# visible and on the CPU provider elsewhere.
COPY pyproject.toml ./
RUN touch README.md \
    && pip install ".[worker]" \
    && pip uninstall -y likeness onnxruntime \
    && pip install "onnxruntime-gpu>=1.20" \
    && rm -rf README.md build ./*.egg-info

COPY . .
# Editable, so the package stays at /app beside weights/.
RUN pip install --no-deps -e . \
    && mkdir -p /data /app/runs \
    && chown likeness:likeness /data /app/runs

USER likeness
CMD ["likeness", "worker"]
