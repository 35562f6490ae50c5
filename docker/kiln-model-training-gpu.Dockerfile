# kiln training and Optuna sweeps on NVIDIA GPUs: `python src/train_model.py [--multirun]` with the CUDA
# build of torch, which switches on the CUDA path of kiln's C++ trainer (whole dataset resident on the
# GPU). The image trains on the GPU by default (no_cuda=false).
#
# Build, from the repo root (as in the template's guides); CUDA_VERSION, TORCH_VERSION and
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cu126) can be changed with --build-arg:
#   docker build \
#     -t $KILN_REGISTRY/model-training-gpu:0.1.0 \
#     -f docker/kiln-model-training-gpu.Dockerfile \
#     --platform linux/amd64 .
#   docker push $KILN_REGISTRY/model-training-gpu:0.1.0
# Run locally (needs the NVIDIA Container Toolkit):
#   chgrp -R 2222 data models && chmod -R g+w models
#   docker run --rm --gpus all \
#     -v "$PWD/data:/home/kiln/kiln/data" -v "$PWD/models:/home/kiln/kiln/models" \
#     -e MLFLOW_TRACKING_USERNAME -e MLFLOW_TRACKING_PASSWORD \
#     $KILN_REGISTRY/model-training-gpu:0.1.0 \
#     python src/train_model.py no_cuda=false mlflow_tracking_uri=http://<MLFLOW_HOST>:5000 epochs=3
# On Run:ai: KILN_GPU=1 deploy/runai/submit-training.sh (or submit-sweep.sh)

ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04

# ---- builder: compiles kiln's C++ core against the CUDA build of torch. CMake's Torch package needs
# the CUDA toolkit (nvcc, headers) and cuDNN headers, hence the -devel image. ----
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Ubuntu replaces a package's version with each security fix, so exact version pins would break the
# build after every fix; the release is pinned by the base image instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-dev python3-venv \
        cmake ninja-build g++ pkg-config libopencv-dev nlohmann-json3-dev libdeflate-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
# TORCH_CUDA_ARCH_LIST: there is no GPU during `docker build` for torch's CMake to probe; kiln compiles
# no CUDA kernels of its own, so the list only silences that probe.
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir "scikit-build-core==1.1.2" "pybind11==3.1.0"
WORKDIR /build/kiln
COPY pyproject.toml CMakeLists.txt README.md ./
COPY cpp cpp
COPY python python
RUN pip wheel --no-build-isolation --no-deps --wheel-dir /wheels .

# ---- model-training-gpu: the runtime image. The CUDA base (not -devel: no compiler) sets the
# NVIDIA_* variables the container runtime needs to mount the driver, and carries libcudart; torch's
# wheel brings its own cuDNN, so the -cudnn variant would only add a second copy. ----
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
# Python and the shared libraries kiln._core links against (Ubuntu 24.04's names for OpenCV 4.6's
# core/imgproc/imgcodecs, libdeflate); no compiler, no headers. Unpinned for the reason above.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv \
        libopencv-core406t64 libopencv-imgcodecs406t64 libopencv-imgproc406t64 libdeflate0 \
    && rm -rf /var/lib/apt/lists/*
# uid/gid 2222 as in the template: `chgrp -R 2222 models outputs` on the host opens a mounted dir to it.
RUN groupadd --gid 2222 kiln \
    && useradd --no-log-init --create-home --home-dir /home/kiln --uid 2222 --gid 2222 --shell /bin/bash kiln \
    && install -d -o kiln -g kiln /home/kiln/kiln /home/kiln/models
# debugpy: the Argo workflow's --debug starts training under it; boto3: the MLflow server of
# deploy/k8s/mlflow runs from this image and stores artifacts in S3.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir /wheels/kiln_mlops-*.whl \
    && pip install --no-cache-dir "debugpy==1.8.22" "boto3==1.44.8"
WORKDIR /home/kiln/kiln
# The code is root-owned (read-only to the app); the working dir is kiln's, for outputs/, logs/, mlruns/.
COPY conf conf
COPY src src
USER 2222:2222
CMD ["python", "src/train_model.py", "no_cuda=false"]
