#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Submits kiln's Optuna sweep (python src/train_model.py --multirun, the sweeper block of
# conf/train_model.yaml) as a Run:ai job. Every trial is an MLflow run tagged hptuning_tag =
# MLFLOW_HPTUNING_TAG (default: the submission's Unix time), so the sweep's runs are found with
# tags.hptuning_tag="<tag>"; the sweep's results land in $KILN_WORKSPACE/multirun/<tag> on the PVC.
#
#   deploy/runai/submit-sweep.sh [--dry-run] [train_model.<key>=<value> | hydra.sweeper.<key>=<value> ...]
#   KILN_SWEEP_TRIALS=20 KILN_GPU=1 deploy/runai/submit-sweep.sh
#
# Needs MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_USERNAME/PASSWORD if the server asks) in the
# environment. Other settings are in deploy/runai/config.env; --dry-run prints the runai command.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "${BASH_SOURCE[0]}" "$@"
require MLFLOW_TRACKING_URI "export it as the URL of the MLflow tracking server (http://<host>:<port>)"
: "${MLFLOW_HPTUNING_TAG:=$(date +%s)}"

training_job hptuning
submit_flags+=(-e "MLFLOW_HPTUNING_TAG=${MLFLOW_HPTUNING_TAG}")

sweep=("hydra.sweeper.n_trials=${KILN_SWEEP_TRIALS}" "hydra.sweep.dir=${KILN_WORKSPACE}/multirun/${MLFLOW_HPTUNING_TAG}")
if [[ -n "$KILN_OPTUNA_STORAGE" ]]; then
  sweep+=("hydra.sweeper.storage=${KILN_OPTUNA_STORAGE}")
fi

submit python src/train_model.py --multirun "${train_overrides[@]}" "${sweep[@]}" "${overrides[@]}"
