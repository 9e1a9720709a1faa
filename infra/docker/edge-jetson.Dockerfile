# syntax=docker/dockerfile:1
# FlowCloud edge daemon for NVIDIA Jetson (JetPack 6 / L4T r36, Ubuntu 22.04, arm64).
#   docker build --platform linux/arm64 -f infra/docker/edge-jetson.Dockerfile -t flowcloud-edge .
#   docker run --device /dev/video0 -e FLOWCLOUD_EDGE_TOKEN=... flowcloud-edge \
#     --gateway gw.example.com:7000 --device-id cam-1 --source camera:/dev/video0
# The token is best passed as FLOWCLOUD_EDGE_TOKEN (an env file or secret), not on the command line.
ARG L4T_IMAGE=nvcr.io/nvidia/l4t-base:r36.2.0

FROM ${L4T_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu 22.04's default Python is 3.10; FlowCloud needs 3.11 (in jammy's universe).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/flowcloud/bin:$PATH
RUN python3.11 -m venv /opt/flowcloud
WORKDIR /src
COPY . .
RUN pip install "/src[edge]"

FROM ${L4T_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 flowcloud \
    && useradd --system --uid 10001 --gid flowcloud --groups video --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin flowcloud
COPY --from=build /opt/flowcloud /opt/flowcloud
ENV PATH=/opt/flowcloud/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# In the video group: cameras (/dev/video*) without root.
USER 10001:10001
WORKDIR /tmp
EXPOSE 9103
ENTRYPOINT ["flowcloud", "edge"]
