# syntax=docker/dockerfile:1
# One image for every Fleetlet component: the console scripts fleetlet-operator, fleetlet-shim, fleetlet-car,
# fleetlet-sim (and the fleetlet CLI), installed in a virtual environment at /opt/fleetlet.
#
#   docker build -t fleetlet:dev .        (make image)
#
# The build stage only installs wheels (every dependency ships manylinux wheels for amd64 and arm64: no
# compiler is needed); the final stage is a fresh slim Python with that environment copied in, no pip, no
# build tools, running as the unprivileged user 10001.
#
# The car sandbox (fleetlet-car, fleetlet-sim) runs each model in a child process that calls
# unshare(CLONE_NEWNET): that needs CAP_SYS_ADMIN in the effective set, which a container gets only as uid 0
# with the capability added (Kubernetes and Docker set no ambient capabilities for other users), e.g.
#   docker run --user 0 --cap-drop ALL --cap-add SYS_ADMIN fleetlet:dev fleetlet-sim ...
# Or run it as 10001 with --allow-network-fallback: a seccomp filter that refuses sockets plus an audit hook.
# The chart's simFleet.networkIsolation chooses between the two. The operator and the shim need neither.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/fleetlet
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fleetlet ./fleetlet
COPY operator ./operator
COPY node-shim ./node-shim
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/fleetlet/bin/pip install --only-binary=:all: --no-binary=fleetlet . \
 && /opt/fleetlet/bin/python -m compileall -q /opt/fleetlet/lib \
 && /opt/fleetlet/bin/pip uninstall -y pip setuptools wheel \
 && for c in fleetlet fleetlet-operator fleetlet-shim fleetlet-car fleetlet-sim; do \
      /opt/fleetlet/bin/$c --help >/dev/null || exit 1; \
    done

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="fleetlet" \
      org.opencontainers.image.description="Fleetlet: parked electric cars as Kubernetes Nodes for batch AI inference" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base image's own pip and setuptools go too: nothing in the final image installs or builds anything.
RUN python -m pip uninstall -y -q pip setuptools wheel 2>/dev/null; \
    groupadd --system --gid 10001 fleetlet \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin fleetlet
COPY --from=build /opt/fleetlet /opt/fleetlet
ENV PATH=/opt/fleetlet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
# Numeric, so that Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
CMD ["fleetlet", "--help"]
