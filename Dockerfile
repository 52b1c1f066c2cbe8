# anna-trio node image: the compose testnet (docker-compose.yml) and a base for deployments.
#
# With a registry (python:3.11-slim, dependencies from PyPI):
#   docker build -t anna-trio:local .
# Without one (README "Compose testnet"): a base image made from Debian packages, and the
# package and its dependencies as wheels built on the host, so the build needs no network:
#   python3 -m pip wheel . -w wheelhouse
#   docker build --network none --build-arg BASE_IMAGE=anna-base:bookworm -t anna-trio:local .
# The base needs python3 with venv, the same Python minor version as the wheels (3.11).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/anna/bin:$PATH

# The build context is the checkout less .dockerignore. A wheelhouse/ holding the anna-trio
# wheel is installed alone (--no-index); otherwise pip builds the checkout and asks the index.
COPY . /build
RUN python3 -m venv /opt/anna \
    && if ls /build/wheelhouse/anna_trio-*.whl >/dev/null 2>&1; then \
           pip install --no-index --find-links /build/wheelhouse anna-trio; \
       else \
           pip install /build; \
       fi \
    && rm -rf /build \
    && annad --version

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/anna \
        --shell /usr/sbin/nologin anna \
    && install -d -o anna -g anna -m 0700 /var/lib/anna \
    && install -d -o anna -g anna -m 0755 /testnet
WORKDIR /var/lib/anna
USER anna

# RPC (this node's port in peers.yml) and the metrics listener (/metrics, /health, /ready).
EXPOSE 8001 9090
# Ready = migrated and listening; the metrics listener is ANNA_METRICS_LISTEN's default port.
HEALTHCHECK --interval=3s --timeout=3s --start-period=10s --retries=10 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/ready', timeout=2)"]
# annad is PID 1: SIGTERM (docker stop, compose down) drains requests and exits 0 within 5 s.
ENTRYPOINT ["annad"]
