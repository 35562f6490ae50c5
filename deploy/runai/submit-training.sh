#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Submits one kiln training run (python src/train_model.py) as a Run:ai job, as in the template's
# Run:ai guide: the processed dataset from the PVC, tracked in MLflow, checkpoints to the PVC.
#
#   deploy/runai/submit-training.sh [--dry-run] [train_model.<key>=<value> ...]
#   KILN_GPU=1 deploy/runai/submit-training.sh      # on a GPU, with the model-training-gpu image
#
# Needs MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_USERNAME/PASSWORD if the server asks) in the
# environment. Other settings are in deploy/runai/config.env; --dry-run prints the runai command.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "${BASH_SOURCE[0]}" "$@"
require MLFLOW_TRACKING_URI "export it as the URL of the MLflow tracking server (http://<host>:<port>)"

if ((KILN_GPU > 0)); then
  base_flags train "$KILN_TRAINING_GPU_IMAGE"
  submit_flags+=(--gpu "$KILN_GPU")
  no_cuda=false
else
  base_flags train "$KILN_TRAINING_IMAGE"
  no_cuda=true
fi
submit_flags+=(--cpu "$KILN_TRAIN_CPU" --memory "$KILN_TRAIN_MEMORY")
mlflow_env_flags

submit python src/train_model.py \
  "train_model.data_dir_path=${KILN_PROCESSED_DATA_DIR}" \
  train_model.setup_mlflow=true \
  "train_model.mlflow_tracking_uri=${MLFLOW_TRACKING_URI}" \
  "train_model.mlflow_exp_name=${KILN_MLFLOW_EXP_NAME}" \
  "train_model.artifact_dir_path=${KILN_MODELS_DIR}" \
  "train_model.log_dir=${KILN_LOG_DIR}" \
  "train_model.no_cuda=${no_cuda}" \
  "train_model.epochs=${KILN_TRAIN_EPOCHS}" \
  "${overrides[@]}"
