#!/usr/bin/env bash
# Default command of the batch-inferencing image: `python src/batch_inferencing.py` on the model at
# PRED_MODEL_PATH (set by kiln-fetch-model from PRED_MODEL_UUID, or given) and the images under
# INPUT_DATA_DIR. Arguments are extra Hydra overrides.
set -euo pipefail

if [[ -z "${PRED_MODEL_PATH:-}" ]]; then
  echo "kiln: no model to run: set PRED_MODEL_PATH to a local model, or PRED_MODEL_UUID (an MLflow run id)" \
    "and MLFLOW_TRACKING_URI to download one" >&2
  exit 2
fi

exec python src/batch_inferencing.py \
  "inference.model_path=${PRED_MODEL_PATH}" \
  "inference.input_data_dir=${INPUT_DATA_DIR:-./data}" \
  "$@"
