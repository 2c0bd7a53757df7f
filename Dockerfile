# Reimbursement engine gRPC service.
#
# BASE defaults to the official Python image; it may also be a bare Debian bookworm image without
# Python (e.g. localhost/bookworm-base from scripts/podman-setup.sh), in which case Python and a
# compiler are installed with apt. Build and runtime stages must use the same BASE: the venv in
# /opt/venv points at the base's interpreter.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Python (when the base has none) and a C compiler for the Cython kernel.
RUN set -eu; \
    set --; \
    if ! command -v python3 >/dev/null 2>&1; then set -- python3 python3-venv python3-dev; fi; \
    if ! command -v gcc >/dev/null 2>&1; then set -- "$@" gcc libc6-dev; fi; \
    if [ "$#" -gt 0 ]; then \
        apt-get update; \
        apt-get install -y --no-install-recommends "$@"; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto/ proto/
COPY engine/ engine/
COPY server/ server/
# Builds the Cython kernel and the protobuf stubs (setup.py), then installs into the venv.
RUN /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/python -I -c "import engine, server"

FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
RUN set -eu; \
    if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --gid 10001 reimburse; \
    useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin reimburse; \
    mkdir -p /data; \
    chown 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /data
USER 10001:10001
VOLUME /data
EXPOSE 50051
# Podman/buildah keep HEALTHCHECK only with `--format docker` (the OCI format has no such field).
# The probe takes its connection settings from the environment, like the server: with TLS set
# REIMBURSE_CA (and REIMBURSE_TLS_SERVER_NAME when the certificate does not name 127.0.0.1; for
# mutual TLS also REIMBURSE_CLIENT_CERT/REIMBURSE_CLIENT_KEY); a plaintext server is started
# with REIMBURSE_INSECURE=1 in the environment so that the probe knows it too.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "server.healthcheck", "--target", "127.0.0.1:50051"]
# Run under an init (docker/podman run --init) so SIGTERM reaches the server.
# Arguments after the image name replace CMD, e.g. --listen 127.0.0.1:PORT --database /data/x.db
# Secure by default: the server refuses to start without TLS and authentication, given by
# environment (secrets mounted read-only), e.g.
#   -e REIMBURSE_TLS_CERT=/run/secrets/tls.crt -e REIMBURSE_TLS_KEY=/run/secrets/tls.key
#   -e REIMBURSE_TOKENS=/run/secrets/tokens [-e REIMBURSE_TLS_CLIENT_CA=/run/secrets/ca.crt]
#   -e REIMBURSE_CA=/run/secrets/ca.crt -e REIMBURSE_DATABASE=postgresql://…
# or, on a trusted network only, -e REIMBURSE_INSECURE=1 (see docs/deployment.md).
ENTRYPOINT ["python", "-m", "server"]
CMD ["--listen", "0.0.0.0:50051", "--database", "/data/ledger.db"]
