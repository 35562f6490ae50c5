#!/usr/bin/env bash
# Entry point of kiln's serving images (fastapi, batch-inferencing): fetches the model to serve, then
# runs the container's command.
#
# With PRED_MODEL_PATH unset and PRED_MODEL_UUID set (an MLflow run id, baked in at build time with
# --build-arg PRED_MODEL_UUID=...), finds that run's model in $MODELS_DIR (the server's setting; in the
# images /home/aisg/from-gcs, where the template's guides mount the host's models folder): a run already
# there, as $MODELS_DIR/<run id> (downloaded earlier by kiln, MLflow or gsutil), is used as it is, with no
# tracking server; otherwise, with MLFLOW_TRACKING_URI set, it is downloaded there. PRED_MODEL_PATH is then
# exported as the checkpoint `python -m kiln.models download` prints last. Doing this here, once, keeps
# gunicorn's workers from each fetching the model. Otherwise the environment is passed on as it is: a
# local PRED_MODEL_PATH is served as given, and the server may still fetch PRED_MODEL_UUID itself.
set -euo pipefail

model_dir="${MODELS_DIR:-/home/aisg/from-gcs}"

if [[ -z "${PRED_MODEL_PATH:-}" && -n "${PRED_MODEL_UUID:-}" ]] \
  && [[ -d "${model_dir}/${PRED_MODEL_UUID}" || -n "${MLFLOW_TRACKING_URI:-}" ]]; then
  if [[ -d "${model_dir}/${PRED_MODEL_UUID}" ]]; then
    echo "kiln: using the model of MLflow run ${PRED_MODEL_UUID} in ${model_dir}/${PRED_MODEL_UUID}" >&2
  else
    echo "kiln: downloading the model of MLflow run ${PRED_MODEL_UUID} from ${MLFLOW_TRACKING_URI} into ${model_dir}" >&2
  fi
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
