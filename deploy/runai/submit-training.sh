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

training_job train
submit python src/train_model.py "${train_overrides[@]}" "${overrides[@]}"
