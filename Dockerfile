# gpserve, CPU image.   docker build -t gpserve:cpu .
# Build arguments: EXTRAS=tensorflow (or torch, or tensorflow,torch) adds a backend.
ARG PYTHON=3.11
FROM python:${PYTHON}-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN useradd --create-home --uid 10001 gpserve \
 && mkdir -p /models /var/cache/gpserve && chown gpserve /var/cache/gpserve
WORKDIR /app

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when they
# change, not when the code does. The CPU image takes plain onnxruntime (smaller).
COPY pyproject.toml README.md ./
ARG EXTRAS=""
RUN mkdir -p gpserve workers cache \
 && touch gpserve/__init__.py workers/__init__.py cache/__init__.py \
 && pip install ".${EXTRAS:+[$EXTRAS]}" \
 && pip uninstall -y gpserve onnxruntime-gpu && pip install onnxruntime \
 && rm -rf gpserve workers cache

COPY gpserve gpserve
COPY workers workers
COPY cache cache
RUN pip install --no-deps . && rm -rf /app/build

USER gpserve
ENV GP_LISTEN=0.0.0.0:9000 GP_CACHE_DIR=/var/cache/gpserve
EXPOSE 9000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9000/control/is_ready', timeout=2).status != 200)"]
ENTRYPOINT ["gpserve"]
CMD ["serve"]
