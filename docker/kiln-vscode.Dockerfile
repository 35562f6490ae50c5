# VS Code workspace for developing kiln: the full toolchain (kiln's C++ core rebuilds here), the test
# services (PostgreSQL), debugpy, and code-server for a browser VS Code on a cluster. It is also the
# image of .devcontainer/devcontainer.json (VS Code: "Dev Containers: Reopen in Container").
#
# Build, from the repo root (as in the template's guide):
#   docker build \
#     -t $KILN_REGISTRY/vscode-server:0.1.0 \
#     -f docker/kiln-vscode.Dockerfile \
#     --platform linux/amd64 .
#   docker push $KILN_REGISTRY/vscode-server:0.1.0
# Run code-server locally (browse to localhost:8080, log in with $PASSWORD), on a clone of the repo:
#   docker run --rm -p 8080:8080 -e PASSWORD="<choose one>" \
#     -v "$PWD:/home/kiln/kiln" $KILN_REGISTRY/vscode-server:0.1.0
# then, in its terminal, once: pip install --no-build-isolation -e ".[dev]"   (builds kiln._core)

# ---- builder: compiles kiln's C++ core into a wheel. The same stage opens every Debian-based kiln
# Dockerfile (tests/test_ops_containers.py checks that they stay identical). ----
FROM python:3.11-slim-bookworm AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Debian stable replaces a package's version with each security fix, so exact version pins would
# break the build after every fix; the release (bookworm) is pinned by the base image instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        cmake ninja-build g++ pkg-config libopencv-dev nlohmann-json3-dev libdeflate-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH
# The extension is compiled against the torch it runs with: same version, same index, as below.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir "scikit-build-core==1.1.2" "pybind11==3.1.0"
WORKDIR /build/kiln
COPY pyproject.toml CMakeLists.txt README.md ./
COPY cpp cpp
COPY python python
RUN pip wheel --no-build-isolation --no-deps --wheel-dir /wheels .

# ---- vscode: the development image (compilers on purpose: kiln's C++ core is rebuilt here) ----
FROM python:3.11-slim-bookworm
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG CODE_SERVER_VERSION=4.96.4
ENV PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/home/kiln/.venv \
    PATH=/home/kiln/.venv/bin:$PATH
# scripts/setup.sh's system packages (so it and scripts/test.sh run here without root), plus git and
# code-server. Unpinned for the reason given in the builder stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        cmake ninja-build g++ ccache pkg-config libopencv-dev libgtest-dev nlohmann-json3-dev libdeflate-dev \
        postgresql \
        git openssh-client curl ca-certificates less \
    && curl -fsSL -o /tmp/code-server.deb \
        "https://github.com/coder/code-server/releases/download/v${CODE_SERVER_VERSION}/code-server_${CODE_SERVER_VERSION}_amd64.deb" \
    && apt-get install -y --no-install-recommends /tmp/code-server.deb \
    && rm -rf /tmp/code-server.deb /var/lib/apt/lists/*
# uid/gid 2222 as in the template. The venv lives in kiln's home so that a dev container that remaps
# kiln's uid to the host user's (devcontainer.json's updateRemoteUserUID) keeps it writable.
RUN groupadd --gid 2222 kiln \
    && useradd --no-log-init --create-home --home-dir /home/kiln --uid 2222 --gid 2222 --shell /bin/bash kiln \
    && install -d -o kiln -g kiln /home/kiln/kiln
USER 2222:2222
# kiln from the builder's wheel brings every runtime dependency; `pip install --no-build-isolation -e .`
# in a clone then replaces it with the editable build.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /home/kiln/.venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir /wheels/kiln_mlops-*.whl \
        "scikit-build-core==1.1.2" "pybind11==3.1.0" "debugpy==1.8.22" "pytest==9.0.3" "ruff==0.17.6"
WORKDIR /home/kiln/kiln
EXPOSE 8080
CMD ["code-server", "--bind-addr", "0.0.0.0:8080", "--auth", "password", "/home/kiln/kiln"]
