# syntax=docker/dockerfile:1
# One image for every ClipChat process:
#   clipchat serve <status|regenerator|composer|gateway>   one service (deploy/k8s runs these)
#   clipchat migrate                                        Alembic migrations (a Kubernetes Job)
# ffmpeg comes from the imageio-ffmpeg wheel; nothing is downloaded beyond pip packages.
#
#   docker build -t clipchat .

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtual environment with the project and its generated protobuf code -------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/clipchat
ENV PATH=/opt/clipchat/bin:$PATH
WORKDIR /src

# Dependencies in their own layer, rebuilt only when pyproject.toml changes: with no source copied
# yet this installs the dependencies and an empty clipchat distribution, removed again below.
COPY pyproject.toml ./
RUN pip install . && pip uninstall --yes clipchat

COPY protos ./protos
COPY clipchat ./clipchat
COPY services ./services
COPY gateway ./gateway
COPY launcher ./launcher

# The generated code (clipchat/v1, gitignored) is made here exactly as `make proto` makes it, minus
# the mypy stubs, then installed with the rest (a regular, non-editable install).
RUN mkdir -p clipchat/v1 \
 && python -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. protos/clipchat/v1/*.proto \
 && touch clipchat/v1/__init__.py \
 && pip install --no-deps . \
 && cd / \
 && python -c "import clipchat.settings, clipchat.v1.jobs_pb2_grpc, imageio_ffmpeg; imageio_ffmpeg.get_ffmpeg_exe()"

# ---- runtime: the virtual environment only, as a non-root user ----------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="clipchat" \
      org.opencontainers.image.description="ClipChat services: status, regenerator, composer, gateway"

# HOME and CLIPCHAT_DATA_DIR point at writable mounts so the root filesystem can be read-only
# (deploy/k8s mounts emptyDirs on /tmp and /var/lib/clipchat). The "video" driver capability lets
# the NVIDIA container runtime mount libnvidia-encode, which ffmpeg's h264_nvenc needs.
ENV PATH=/opt/clipchat/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    CLIPCHAT_DATA_DIR=/var/lib/clipchat \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,video

RUN groupadd --system --gid 10001 clipchat \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/clipchat \
      --shell /usr/sbin/nologin clipchat \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/clipchat

COPY --from=build /opt/clipchat /opt/clipchat

USER 10001:10001
WORKDIR /var/lib/clipchat
# gateway (HTTP), status, regenerator, composer (gRPC)
EXPOSE 8000 50051 50052 50053

ENTRYPOINT ["clipchat"]
CMD ["--help"]
