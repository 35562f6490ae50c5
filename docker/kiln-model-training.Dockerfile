# kiln training and Optuna sweeps on CPU: `python src/train_model.py [--multirun]` (conf/train_model.yaml).
# For GPUs use docker/kiln-model-training-gpu.Dockerfile.
#
# Build, from the repo root (as in the template's Run:ai guide):
#   docker build \
#     -t $KILN_REGISTRY/model-training:0.1.0 \
#     -f docker/kiln-model-training.Dockerfile \
#     --platform linux/amd64 .
#   docker push $KILN_REGISTRY/model-training:0.1.0
# Run locally on ./data/processed, tracking to an MLflow server (checkpoints go to ./models):
#   chgrp -R 2222 data models && chmod -R g+w models
#   docker run --rm \
#     -v "$PWD/data:/home/kiln/kiln/data" -v "$PWD/models:/home/kiln/kiln/models" \
#     -e MLFLOW_TRACKING_USERNAME -e MLFLOW_TRACKING_PASSWORD \
#     $KILN_REGISTRY/model-training:0.1.0 \
#     python src/train_model.py mlflow_tracking_uri=http://<MLFLOW_HOST>:5000 epochs=3
# On Run:ai: deploy/runai/submit-training.sh, deploy/runai/submit-sweep.sh

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

# ---- model-training: the runtime image ----
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
    && install -d -o kiln -g kiln /home/kiln/kiln /home/kiln/models
# debugpy: the Argo workflow's --debug starts training under it; boto3: the MLflow server of
# deploy/k8s/mlflow runs from this image and stores artifacts in S3.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir /wheels/kiln_mlops-*.whl \
    && pip install --no-cache-dir "debugpy==1.8.22" "boto3==1.44.8"
WORKDIR /home/kiln/kiln
# The code is root-owned (read-only to the app); the working dir is kiln's, for outputs/, logs/, mlruns/.
COPY conf conf
COPY src src
USER 2222:2222
CMD ["python", "src/train_model.py"]
