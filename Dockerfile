# syntax=docker/dockerfile:1
# llm-sidecar image: `docker build -t llm-sidecar .`
#
#   docker run -p 8080:8080 llm-sidecar                       # embedded default policy
#   docker run -p 8080:8080 -v $PWD/policies:/etc/llm-sidecar:ro \
#       -e LLM_SIDECAR_POLICY=/etc/llm-sidecar/default.yaml llm-sidecar
#   docker run ... llm-sidecar --policy /etc/llm-sidecar/default.yaml   # same, as an argument
#   docker run --rm --entrypoint llm-sidecar llm-sidecar check /etc/llm-sidecar/default.yaml
#
# The entrypoint fixes the listen address to 0.0.0.0:8080 (a policy's
# 127.0.0.1 default would be unreachable from outside the container); later
# arguments win, so `--port 9000` still overrides it.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: resolve and install everything into a venv ----------------------
# Every dependency ships manylinux wheels for 3.11, so no compiler is needed
# here either; the final stage copies only the venv.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
# The same locked versions and hashes `make run` installs: a new release of a
# dependency (aiohttp's writer internals, say) never changes an image unasked.
COPY requirements/run.txt ./requirements/run.txt
# proxy/default_policy.yaml is a symlink to policies/default.yaml: COPY keeps
# symlinks as they are, so its target must be in the context too.
COPY policies/default.yaml ./policies/default.yaml
COPY proxy ./proxy
# Fail the build, not the first start, if the embedded default policy did not
# make it into the installed package.
RUN /opt/venv/bin/pip install --compile --require-hashes -r requirements/run.txt \
    && /opt/venv/bin/pip install --compile --no-deps . \
    && /opt/venv/bin/python -c "import importlib.resources as r; \
assert r.files('proxy').joinpath('default_policy.yaml').is_file(), 'default policy missing'" \
    && /opt/venv/bin/llm-sidecar check policies/default.yaml

# ---- runtime: the same slim base, the venv, a non-root user -----------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="llm-sidecar" \
      org.opencontainers.image.description="Coalescing, caching reverse proxy for OpenAI-compatible LLM APIs"
# A fixed numeric UID/GID so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 llm \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin llm
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8080
# The app drains on SIGTERM (readiness off, stop accepting, finish in-flight, exit 0).
STOPSIGNAL SIGTERM
# No curl in the slim image: urllib raises on a refused connection or a non-2xx.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# Exec form: llm-sidecar is PID 1 and receives the stop signal itself.
ENTRYPOINT ["llm-sidecar", "serve", "--host", "0.0.0.0", "--port", "8080"]
CMD []
