# syntax=docker/dockerfile:1
# The fmnist images (docs/containers.md). Two targets:
#   serve   the serving worker and the clients: serve, predict, models, send, listen. Keras on
#           JAX, no TensorFlow (requirements/serve.txt). The default target.
#   train   the whole tool: also train, evaluate and job workers (`serve --jobs`), with
#           TensorFlow, matplotlib and Debian's copy of the dataset.
#
#   docker build -t fmnist-serve:0.1.0 .
#   docker build --target train -t fmnist-train:0.1.0 .
#   docker run --rm --read-only --tmpfs /tmp --network host fmnist-serve:0.1.0
#
# Behind a proxy that re-signs TLS, give pip the proxy's CA bundle (optional; used only while
# installing, never stored in the image):  --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt
# scripts/images builds both with podman, from a Debian base it makes itself where Docker Hub
# cannot be reached.

ARG BASE=debian:bookworm-slim

# Debian's Python 3.11 and the user every image runs as (uid 10001, as deploy/k8s expects).
FROM ${BASE} AS python
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin fmnist

# A virtualenv with what serving needs, then fmnist itself without its dependency list (which
# is the whole tool's, TensorFlow included).
FROM python AS build-serve
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY constraints.txt ./
COPY requirements/ requirements/
RUN --mount=type=secret,id=ca --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && python3 -m venv /opt/fmnist \
 && /opt/fmnist/bin/python -m pip install -q -c constraints.txt -r requirements/serve.txt
COPY pyproject.toml README.md ./
COPY fmnist/ fmnist/
RUN --mount=type=secret,id=ca --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && /opt/fmnist/bin/python -m pip install -q --no-deps . \
 && /opt/fmnist/bin/python -m pip uninstall -q -y pip

# The same virtualenv with the rest of fmnist's dependencies: TensorFlow and matplotlib.
FROM build-serve AS build-train
RUN --mount=type=secret,id=ca --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && /opt/fmnist/bin/python -m ensurepip >/dev/null \
 && /opt/fmnist/bin/python -m pip install -q -c constraints.txt . \
 && /opt/fmnist/bin/python -m pip uninstall -q -y pip

# What both images share: the venv on PATH, fmnist's configs and sample images read-only under
# FMNIST_HOME, and one writable place, /var/cache/fmnist (weights, models fetched from the
# registry, JAX's compile cache, the in-flight journal that a restarted worker reads to end
# crash loops), so the root filesystem can be read-only.
FROM python AS runtime
ENV PATH=/opt/fmnist/bin:$PATH \
    FMNIST_HOME=/usr/share/fmnist \
    FMNIST_MODEL__WEIGHTS_DIR=/var/cache/fmnist/weights \
    FMNIST_SERVE__COMPILE_CACHE=/var/cache/fmnist/jax \
    FMNIST_SERVE__JOURNAL_DIR=/var/cache/fmnist/inflight \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY configs/ /usr/share/fmnist/configs/
COPY Images/ /usr/share/fmnist/Images/
RUN install -d -o fmnist -g fmnist /var/cache/fmnist /var/cache/fmnist/weights /var/cache/fmnist/jax
# SIGTERM drains: the batch in flight is answered and committed, then the worker exits 0
# (docs/reliability.md#shutdown).
STOPSIGNAL SIGTERM
ENTRYPOINT ["fmnist"]

FROM runtime AS train
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY --from=build-train /opt/fmnist /opt/fmnist
COPY --chown=fmnist:fmnist weights/fmnist.keras weights/fmnist.meta.json \
     weights/fmnist-full.keras weights/fmnist-full.meta.json /var/cache/fmnist/weights/
# the distillation teacher sits with the other weights (train.teacher)
ENV FMNIST_TRAIN__TEACHER=/var/cache/fmnist/weights/fmnist-full.keras
VOLUME /var/cache/fmnist
USER fmnist
CMD ["serve", "--jobs", "--broker", "kafka"]

# The default target: last in the file.
FROM runtime AS serve
COPY --from=build-serve /opt/fmnist /opt/fmnist
COPY --chown=fmnist:fmnist weights/fmnist.keras weights/fmnist.meta.json /var/cache/fmnist/weights/
ENV KERAS_BACKEND=jax \
    FMNIST_SERVE__METRICS_PORT=9464 \
    FMNIST_SERVE__METRICS_HOST=0.0.0.0
VOLUME /var/cache/fmnist
USER fmnist
EXPOSE 9464
# /healthz: the serve loop polled the broker within the last 30 s (docs/operations.md), on
# whatever port serve.metrics_port says. Until the model is warm the port is closed, which
# start-period covers. Not /readyz: a broker outage must not mark the worker for a restart.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FMNIST_SERVE__METRICS_PORT', '9464'), timeout=2)"]
CMD ["serve", "--broker", "kafka", "--quiet"]
