# kiln's FastAPI server: `gunicorn kiln_fastapi.main:APP` with 4 uvicorn workers on port 8080
# (POST /api/v1/model/predict, GET /api/v1/model/version, /docs).
#
# Build, from the repo root, for the model of one MLflow run (as in the template's guide):
#   docker build \
#     -t $KILN_REGISTRY/fastapi-server:0.1.0 \
#     --build-arg PRED_MODEL_UUID="$PRED_MODEL_UUID" \
#     -f docker/kiln-fastapi.Dockerfile \
#     --platform linux/amd64 .
# Run: the model is downloaded from MLflow once at start-up, before the workers fork, into the mounted
# ./models (or serve a local one: -e PRED_MODEL_PATH=/home/kiln/models/<...>):
#   sudo chgrp -R 2222 models && sudo chmod -R g+w models
#   docker run --rm -p 8080:8080 \
#     -e MLFLOW_TRACKING_URI=http://<MLFLOW_HOST>:5000 -e MLFLOW_TRACKING_USERNAME -e MLFLOW_TRACKING_PASSWORD \
#     -v "$PWD/models:/home/kiln/models" \
#     $KILN_REGISTRY/fastapi-server:0.1.0
#   curl localhost:8080/api/v1/model/version
#   docker push $KILN_REGISTRY/fastapi-server:0.1.0

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

# ---- fastapi: the runtime image ----
FROM python:3.11-slim-bookworm
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PRED_MODEL_UUID=""
ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    PRED_MODEL_UUID=${PRED_MODEL_UUID} \
    MODELS_DIR=/home/kiln/models \
    LOGGER_CONFIG_PATH=/home/kiln/kiln/conf/logging.yaml
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
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir /wheels/kiln_mlops-*.whl
# kiln-fetch-model: with PRED_MODEL_UUID and MLFLOW_TRACKING_URI set and no PRED_MODEL_PATH, downloads
# that run's model into $MODELS_DIR and exports PRED_MODEL_PATH before running the command.
COPY --chmod=0755 docker/entrypoints/kiln-fetch-model.sh /usr/local/bin/kiln-fetch-model
WORKDIR /home/kiln/kiln
# The code is root-owned (read-only to the app); the working dir is kiln's, for outputs/, logs/, mlruns/.
COPY conf conf
COPY src src
# gunicorn runs in src/ (--chdir src), where conf/logging.yaml's ./logs/*.log files go.
RUN install -d -o kiln -g kiln /home/kiln/kiln/src/logs
USER 2222:2222
EXPOSE 8080
ENTRYPOINT ["kiln-fetch-model"]
CMD ["gunicorn", "kiln_fastapi.main:APP", "-b", "0.0.0.0:8080", "-w", "4", "-k", "uvicorn.workers.UvicornWorker", "--chdir", "src"]
