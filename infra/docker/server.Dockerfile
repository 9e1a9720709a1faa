# syntax=docker/dockerfile:1
# FlowCloud services on CPU: gateway, API, CPU-mode worker, and the CLI (devices, apikeys).
#   docker build -f infra/docker/server.Dockerfile -t flowcloud .
#   docker run flowcloud gateway | worker | api | devices add cam-1 --tenant acme
# Build context: the repository root (server.Dockerfile.dockerignore keeps it small).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/flowcloud/bin:$PATH
RUN python -m venv /opt/flowcloud \
    && pip install torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY . .
RUN pip install "/src[server]"

FROM ${PYTHON_IMAGE}
# A fixed non-root UID/GID (the chart's securityContext and compose use 10001).
RUN groupadd --system --gid 10001 flowcloud \
    && useradd --system --uid 10001 --gid flowcloud --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin flowcloud \
    && install -d -o flowcloud -g flowcloud -m 0700 /run/flowcloud
COPY --from=build /opt/flowcloud /opt/flowcloud
ENV PATH=/opt/flowcloud/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
# gateway TCP, API HTTP, gateway and worker metrics
EXPOSE 7000 8000 9101 9102
ENTRYPOINT ["flowcloud"]
CMD ["api"]
