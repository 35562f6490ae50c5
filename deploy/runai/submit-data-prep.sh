#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Submits kiln's data preparation (python src/process_data.py) as a Run:ai job, as in the template's
# Run:ai guide: raw images on the PVC in, the processed dataset on the PVC out.
#
#   deploy/runai/submit-data-prep.sh [--dry-run] [process_data.<key>=<value> ...]
#
# Settings (image, PVC, paths, resources) are in deploy/runai/config.env and can be overridden from
# the environment; --dry-run prints the runai command instead of submitting it.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "${BASH_SOURCE[0]}" "$@"

base_flags data-prep "$KILN_DATA_PREP_IMAGE"
submit_flags+=(--cpu "$KILN_DATA_PREP_CPU" --memory "$KILN_DATA_PREP_MEMORY")

submit python src/process_data.py \
  "process_data.raw_data_dir_path=${KILN_RAW_DATA_DIR}" \
  "process_data.processed_data_dir_path=${KILN_PROCESSED_DATA_DIR}" \
  "process_data.log_dir=${KILN_LOG_DIR}" \
  "${overrides[@]}"
