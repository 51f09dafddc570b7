# syntax=docker/dockerfile:1
# The HTTP API (app/): FastAPI under uvicorn, no torch. Build from the repository root:
#   docker build -f docker/api.Dockerfile -t likeness-api .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LIKENESS_DATA_DIR=/data

# One unprivileged user, with the same ids in both images: they share the data volume.
RUN groupadd --system --gid 10001 likeness \
    && useradd --system --uid 10001 --gid likeness --create-home --home-dir /home/likeness likeness

WORKDIR /app
COPY pyproject.toml README.md ./
COPY likeness/ likeness/
COPY app/ app/
# Torch-free at import; the `likeness` command loads it (the API itself never does).
COPY worker/ worker/
COPY cli/ cli/
COPY weights/ weights/
# Editable, so the package stays at /app beside weights/ (likeness.manifest finds the
# manifest and the bundled weights next to the package). Only the core dependencies:
# no extras, no torch. The source stays root-owned and read-only for the user.
RUN pip install -e . \
    && mkdir -p /data \
    && chown likeness:likeness /data

USER likeness
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]
