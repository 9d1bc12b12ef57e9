# gpserve, CPU image.   docker build -t gpserve:cpu .
# Build arguments:
#   BASE    the base image (default python:3.11-slim). Any Debian bookworm image works:
#           on an air-gapped host, one made with debootstrap (docs/deployment.md); what it
#           lacks (Python 3.11, venv, CA certificates) the first step adds from Debian.
#   EXTRAS  tensorflow (or torch, or tensorflow,torch) adds a backend.
#   PIP_CERT  a CA bundle for pip, for hosts whose way to PyPI needs one (mount it in
#           with `podman build -v`); pip reads it from the environment of each step.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG PIP_CERT

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update \
     && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
     && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/gpserve \
 && useradd --create-home --uid 10001 gpserve \
 && mkdir -p /models /var/cache/gpserve && chown gpserve /var/cache/gpserve
ENV PATH=/opt/gpserve/bin:$PATH
WORKDIR /app

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when they
# change, not when the code does. The CPU image takes plain onnxruntime (about a tenth
# of onnxruntime-gpu's size), so the GPU package is left out of the list, not installed.
COPY pyproject.toml README.md deploy/docker/requirements.py ./
ARG EXTRAS=""
RUN python requirements.py "$EXTRAS" --cpu > requirements.txt \
 && pip install -r requirements.txt && rm requirements.txt requirements.py

COPY gpserve gpserve
COPY workers workers
COPY cache cache
COPY deploy/docker/entrypoint.sh /usr/local/bin/gpserve-entrypoint
RUN pip install --no-deps . && rm -rf /app/build

USER gpserve
ENV GP_LISTEN=0.0.0.0:9000 GP_CACHE_DIR=/var/cache/gpserve \
    GP_MODELS_DIR=/home/gpserve/.cache/gpserve/models
EXPOSE 9000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9000/control/is_ready', timeout=2).status != 200)"]
ENTRYPOINT ["gpserve-entrypoint"]
CMD ["serve"]
