#!/usr/bin/env bash
# Entry point of kiln's serving images (fastapi, batch-inferencing): fetches the model to serve, then
# runs the container's command.
#
# With PRED_MODEL_PATH unset and both PRED_MODEL_UUID (an MLflow run id, baked in at build time with
# --build-arg PRED_MODEL_UUID=...) and MLFLOW_TRACKING_URI set, downloads that run's model into
# $MODELS_DIR (the server's setting; default /home/kiln/models, mount a volume there to keep it) and exports
# PRED_MODEL_PATH as the path `python -m kiln.models download` prints last. Downloading here, once,
# keeps gunicorn's workers from each fetching the model. Otherwise the environment is passed on as it
# is: a local PRED_MODEL_PATH is served as given, and the server may still fetch PRED_MODEL_UUID itself.
set -euo pipefail

model_dir="${MODELS_DIR:-/home/kiln/models}"

if [[ -z "${PRED_MODEL_PATH:-}" && -n "${PRED_MODEL_UUID:-}" && -n "${MLFLOW_TRACKING_URI:-}" ]]; then
  echo "kiln: downloading the model of MLflow run ${PRED_MODEL_UUID} from ${MLFLOW_TRACKING_URI} into ${model_dir}" >&2
  downloaded="$(python -m kiln.models download "${PRED_MODEL_UUID}" --dst "${model_dir}")"
  PRED_MODEL_PATH="$(tail -n 1 <<<"${downloaded}")"
  if [[ -z "${PRED_MODEL_PATH}" ]]; then
    echo "kiln: 'python -m kiln.models download' printed no model path" >&2
    exit 1
  fi
  export PRED_MODEL_PATH
  echo "kiln: PRED_MODEL_PATH=${PRED_MODEL_PATH}" >&2
fi

exec "$@"
