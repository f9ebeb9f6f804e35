# freesegdiff: Label Studio ML backend (FreeSeg-Diff). GPU: run with the NVIDIA container toolkit.
#
# Base: a plain Python image. The PyPI torch wheel that scripts/setup.sh installs from
# locks/backend.txt (the same install, and the same versions, CI runs) carries its own CUDA
# libraries, so a PyTorch base image would only add a second copy of torch; the host needs the
# NVIDIA driver only. The lock is for CPython 3.11 on Linux x86_64: keep this base at 3.11.
FROM python:3.11-slim-bookworm

# The image alone never asks the hub (HF_HUB_OFFLINE=1); docker-compose.yml turns downloads on
# (FREESEG_ALLOW_DOWNLOADS=true, HF_HUB_OFFLINE=0) into the models volume, or run `freesegdiff download`.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MODEL_DIR=/data/models \
    HF_HOME=/data/models/huggingface \
    HF_HUB_OFFLINE=1

# gcc for pydensecrf2's source build; curl for the health check
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential curl \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 freeseg \
    && mkdir -p /data/models \
    && chown freeseg /data/models

WORKDIR /app
COPY pyproject.toml README.md ./
COPY locks/backend.txt locks/backend.txt
COPY scripts/setup.sh scripts/setup.sh
COPY backend backend
RUN bash scripts/setup.sh && chown -R freeseg /app

USER freeseg
VOLUME /data/models
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9090/health || exit 1
CMD ["/app/.venv/bin/freesegdiff", "serve", "--host", "0.0.0.0", "--port", "9090"]
