# The HTTP API (app/): FastAPI under uvicorn, no torch. Build from the repository root:
#   docker build -f docker/api.Dockerfile -t likeness-api .
# PYTHON_IMAGE names the base image; where no registry can be reached,
# docker/base-images.sh builds a stand-in from Debian's packages and names it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LIKENESS_DATA_DIR=/data

# One unprivileged user, with the same ids in both images: they share the data volume.
RUN groupadd --system --gid 10001 likeness \
    && useradd --system --uid 10001 --gid likeness --create-home --home-dir /home/likeness likeness

WORKDIR /app
# The dependencies in a layer of their own that only pyproject.toml invalidates: the
# project is installed once without its source (an empty README stands in for the
# real one), which brings in its dependencies, and then removed again.
# Only the core dependencies: no extras, no torch.
COPY pyproject.toml ./
RUN touch README.md \
    && pip install . \
    && pip uninstall -y likeness \
    && rm -rf README.md build ./*.egg-info

# The whole context, so a new top-level package comes along; .dockerignore keeps
# tests, docs, runs and caches out. Torch-free at import; the `likeness` command
# loads it (the API itself never does).
COPY . .
# Editable, so the package stays at /app beside weights/ (likeness.manifest finds the
# manifest and the bundled weights next to the package). The source stays root-owned
# and read-only for the user.
RUN pip install --no-deps -e . \
    && mkdir -p /data \
    && chown likeness:likeness /data

USER likeness
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]
