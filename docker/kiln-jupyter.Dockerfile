# Jupyter Lab workspace for kiln: kiln, torch (CPU), MLflow and the notebooks' tools, the repo's
# src/ and conf/ under /home/kiln/kiln; notebooks/ is mounted or cloned there.
#
# Build, from the repo root (as in the template's guide):
#   docker build \
#     -t $KILN_REGISTRY/jupyter:0.1.0 \
#     -f docker/kiln-jupyter.Dockerfile \
#     --platform linux/amd64 .
#   docker push $KILN_REGISTRY/jupyter:0.1.0
# Run locally (the login token is printed in the log; the image runs as uid/gid 2222):
#   chgrp -R 2222 notebooks data && chmod -R g+w notebooks data
#   docker run --rm -p 8888:8888 \
#     -v "$PWD/notebooks:/home/kiln/kiln/notebooks" -v "$PWD/data:/home/kiln/kiln/data" \
#     $KILN_REGISTRY/jupyter:0.1.0
# On a cluster, point Jupyter at the persistent volume instead: ... jupyter lab --ServerApp.root_dir=/<PVC>/workspaces/<YOUR_NAME>

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

# ---- jupyter: the workspace image (no compiler) ----
FROM python:3.11-slim-bookworm
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
# Only the shared libraries kiln._core links against (OpenCV's core/imgproc/imgcodecs, libdeflate);
# no compiler, no headers. Unpinned for the reason given in the builder stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libopencv-core406 libopencv-imgcodecs406 libopencv-imgproc406 libdeflate0 \
    && rm -rf /var/lib/apt/lists/*
# uid/gid 2222 as in the template: `chgrp -R 2222 models outputs` on the host opens a mounted dir to it.
RUN groupadd --gid 2222 kiln \
    && useradd --no-log-init --create-home --home-dir /home/kiln --uid 2222 --gid 2222 --shell /bin/bash kiln \
    && install -d -o kiln -g kiln /home/kiln/kiln /home/kiln/models /opt/venv
# A workspace: the venv is kiln's, so `%pip install` works in a notebook.
USER 2222:2222
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir /wheels/kiln_mlops-*.whl "jupyterlab==4.6.6" "ipykernel==7.4.0" "ipywidgets==8.1.9"
WORKDIR /home/kiln/kiln
COPY --chown=2222:2222 conf conf
COPY --chown=2222:2222 src src
EXPOSE 8888
CMD ["jupyter", "lab", "--ip=0.0.0.0", "--port=8888", "--no-browser", "--ServerApp.root_dir=/home/kiln/kiln"]
