#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Submits one kiln training run (python src/train_model.py) as a Run:ai job, as in the template's
# Run:ai guide: the processed dataset from the PVC, tracked in MLflow, checkpoints to the PVC.
#
#   deploy/runai/submit-training.sh [--dry-run] [train_model.<key>=<value> ...]
#   KILN_GPU=1 deploy/runai/submit-training.sh      # on a GPU, with the model-training-gpu image
#   KILN_GPU=4 deploy/runai/submit-training.sh      # data-parallel on 4 GPUs: torchrun --nproc-per-node 4
#
# Needs MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_USERNAME/PASSWORD if the server asks) in the
# environment. Other settings are in deploy/runai/config.env; --dry-run prints the runai command.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "${BASH_SOURCE[0]}" "$@"
require MLFLOW_TRACKING_URI "export it as the URL of the MLflow tracking server (http://<host>:<port>)"

training_job train
if ((KILN_GPU > 1)); then
  # One process per GPU, one model: train_bs is per GPU (README, "Training on several GPUs or machines").
  submit torchrun --standalone --nproc-per-node "$KILN_GPU" src/train_model.py "${train_overrides[@]}" "${overrides[@]}"
else
  submit python src/train_model.py "${train_overrides[@]}" "${overrides[@]}"
fi
