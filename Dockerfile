# anna-trio node image: the compose testnet (docker-compose.yml) and a base for deployments.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && rm -rf /build

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/anna \
        --shell /usr/sbin/nologin anna \
    && install -d -o anna -g anna -m 0700 /var/lib/anna \
    && install -d -o anna -g anna -m 0755 /testnet
WORKDIR /var/lib/anna
USER anna

# RPC (this node's port in peers.yml) and the metrics listener (/metrics, /health, /ready).
EXPOSE 8001 9090
ENTRYPOINT ["annad"]
