# syntax=docker/dockerfile:1
# FlowCloud GPU worker on a CUDA runtime base (the NVIDIA driver comes from the node).
#   docker build -f infra/docker/worker-cuda.Dockerfile -t flowcloud-worker-cuda .
#   docker run --gpus all -e FLOWCLOUD_REDIS_URL=... -e FLOWCLOUD_WORKER_DEVICE=cuda flowcloud-worker-cuda
# The training image (the chart's training Job) is the same with the train extra:
#   docker build -f infra/docker/worker-cuda.Dockerfile --build-arg EXTRAS=server,train -t flowcloud-train-cuda .
# Ubuntu 24.04 ships Python 3.12 (FlowCloud needs >= 3.11).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG EXTRAS=server
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/flowcloud/bin:$PATH
RUN python3 -m venv /opt/flowcloud \
    && pip install torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY . .
RUN pip install "/src[${EXTRAS}]"

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 flowcloud \
    && useradd --system --uid 10001 --gid flowcloud --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin flowcloud
COPY --from=build /opt/flowcloud /opt/flowcloud
ENV PATH=/opt/flowcloud/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    FLOWCLOUD_WORKER_DEVICE=cuda NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /tmp
EXPOSE 9102
ENTRYPOINT ["flowcloud"]
CMD ["worker"]
