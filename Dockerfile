# The Session Manager and the livekit-server it is tested with, in one image:
#   docker build -t session-manager .
#   docker run --rm -p 127.0.0.1:8080:8080 -e SESSION_MANAGER_API_KEYS="<key> admin" session-manager
# Inside the container the API listens on 0.0.0.0, so the manager refuses to start without API
# keys (SESSION_MANAGER_API_KEYS, or SESSION_MANAGER_ALLOW_UNAUTHENTICATED=true to accept that
# anyone who reaches the port controls it). Run alone, it starts its managed LiveKit on loopback
# inside the container: enough to try the API; for clients to join rooms, compose.yaml runs
# LiveKit as a service of its own (the same image, `livekit-server` as the entrypoint).
# tests/unit/test_packaging.py keeps this file in step with the bootstrap: the same LiveKit tag,
# the same lock, no extra the daemon does not need.

# The one LiveKit version (session_manager/livekit/install.py LIVEKIT_TAG).
ARG LIVEKIT_TAG=v1.13.5

# 1. livekit-server from the Go module proxy, as `session-manager install-livekit` builds it.
FROM golang:1.26 AS livekit
ARG LIVEKIT_TAG
# CGO off: one static binary, which runs on the slim Python image below.
RUN CGO_ENABLED=0 GOBIN=/out go install -trimpath \
        "github.com/livekit/livekit-server/cmd/server@${LIVEKIT_TAG}" \
    && mv /out/server /out/livekit-server \
    && /out/livekit-server --version

# 2. The wheel, from the sources alone (.dockerignore keeps the rest of the tree out).
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY session_manager ./session_manager
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# 3. What runs: the package with its runtime dependencies only (no `sdk`, no `dev`: the daemon
# imports neither), at the versions of requirements.lock, the ones CI tests.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SESSION_MANAGER_HOST=0.0.0.0 \
    SESSION_MANAGER_PORT=8080 \
    SESSION_MANAGER_DATA_DIR=/var/lib/session-manager
COPY requirements.lock /tmp/requirements.lock
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir --constraint /tmp/requirements.lock /tmp/wheels/session_manager-*.whl \
    && rm -r /tmp/wheels /tmp/requirements.lock
COPY --from=livekit /out/livekit-server /usr/local/bin/livekit-server
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/manager manager \
    && mkdir -p /var/lib/session-manager \
    && chown manager:manager /var/lib/session-manager
USER manager
WORKDIR /home/manager
VOLUME ["/var/lib/session-manager"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=40s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SESSION_MANAGER_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["session-manager"]
CMD ["serve"]
