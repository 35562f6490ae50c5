# Shared by the submit-*.sh scripts in this folder: settings, command-line parsing, MLflow flags and
# the submission itself (or, with --dry-run, the command that would be submitted).
# shellcheck shell=bash source-path=SCRIPTDIR

# shellcheck source=config.env
source "$(dirname "${BASH_SOURCE[0]}")/config.env"

dry_run=false
overrides=()

# Parses the submit script's arguments (after the script's own path): -n/--dry-run, -h/--help (prints
# the script's header comment); everything else is passed on to the Hydra app as extra overrides
# (e.g. train_model.lr=1.0).
parse_args() {
  local usage
  usage="$(awk 'NR > 2 && /^#/ { sub(/^# ?/, ""); print; next } NR > 2 { exit }' "$1")"
  shift
  while (($#)); do
    case "$1" in
      -n | --dry-run) dry_run=true ;;
      -h | --help)
        printf '%s\n' "$usage"
        exit 0
        ;;
      --) ;;
      -*)
        printf 'Unknown option %s\n\n%s\n' "$1" "$usage" >&2
        exit 2
        ;;
      *) overrides+=("$1") ;;
    esac
    shift
  done
}

require() {
  local name="$1" hint="$2"
  if [[ -z "${!name:-}" ]]; then
    printf 'kiln runai: %s is not set; %s\n' "$name" "$hint" >&2
    exit 2
  fi
}

# runai flags common to every kiln job: project, image, working dir, PVC.
base_flags() {
  local job_name="$1" image="$2"
  submit_flags=(--job-name-prefix "${KILN_RUNAI_USER}-${job_name}" -i "$image" --working-dir "$KILN_WORKING_DIR"
    --pvc "${KILN_PVC}:${KILN_PVC_MOUNT}")
  if [[ -n "$KILN_RUNAI_PROJECT" ]]; then
    submit_flags+=(-p "$KILN_RUNAI_PROJECT")
  fi
}

# -e flags for the MLflow client in the job: the tracking server and its credentials, S3 artifacts.
mlflow_env_flags() {
  submit_flags+=(-e "MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI}")
  if [[ -n "${MLFLOW_TRACKING_USERNAME:-}" ]]; then
    submit_flags+=(-e "MLFLOW_TRACKING_USERNAME=${MLFLOW_TRACKING_USERNAME}")
  fi
  if [[ -n "${MLFLOW_TRACKING_PASSWORD:-}" ]]; then
    submit_flags+=(-e "MLFLOW_TRACKING_PASSWORD=${MLFLOW_TRACKING_PASSWORD}")
  fi
  if [[ -n "$KILN_S3_SECRET" ]]; then
    submit_flags+=(-e "AWS_ACCESS_KEY_ID=SECRET:${KILN_S3_SECRET},accessKeyId"
      -e "AWS_SECRET_ACCESS_KEY=SECRET:${KILN_S3_SECRET},secretAccessKey")
  fi
  if [[ -n "$MLFLOW_S3_ENDPOINT_URL" ]]; then
    submit_flags+=(-e "MLFLOW_S3_ENDPOINT_URL=${MLFLOW_S3_ENDPOINT_URL}")
  fi
}

# What a training job and a sweep job share: runai flags for the training image (the GPU one, with
# --gpu, when KILN_GPU > 0), CPU, memory and the MLflow client; and, in train_overrides, the
# train_model.py overrides that point the job at the PVC's dataset and models and at the server.
training_job() {
  local job_name="$1" no_cuda=true
  if ((KILN_GPU > 0)); then
    base_flags "$job_name" "$KILN_TRAINING_GPU_IMAGE"
    submit_flags+=(--gpu "$KILN_GPU")
    no_cuda=false
  else
    base_flags "$job_name" "$KILN_TRAINING_IMAGE"
  fi
  submit_flags+=(--cpu "$KILN_TRAIN_CPU" --memory "$KILN_TRAIN_MEMORY")
  mlflow_env_flags
  # shellcheck disable=SC2034 # read by the submit scripts
  train_overrides=(
    "train_model.data_dir_path=${KILN_PROCESSED_DATA_DIR}"
    train_model.setup_mlflow=true
    "train_model.mlflow_tracking_uri=${MLFLOW_TRACKING_URI}"
    "train_model.mlflow_exp_name=${KILN_MLFLOW_EXP_NAME}"
    "train_model.artifact_dir_path=${KILN_MODELS_DIR}"
    "train_model.log_dir=${KILN_LOG_DIR}"
    "train_model.no_cuda=${no_cuda}"
    "train_model.epochs=${KILN_TRAIN_EPOCHS}"
  )
}

# The job's command as the template's Run:ai guide writes it: /bin/bash -c "source activate kiln && <command>",
# the image's environment (the conda env `kiln`, docker/entrypoints/activate) activated first. A word of
# the command that is not plain is single-quoted inside that string, so overrides with spaces or quotes
# reach the app as given.
job_command() {
  local line="source activate kiln &&" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      line+=" $word"
    else
      line+=" '${word//\'/\'\\\'\'}'"
    fi
  done
  job=(/bin/bash -c "$line")
}

# One word of the printed command, ready to paste: bare when it is plain, else in double quotes (as the
# guide writes the job's command) with \ " $ ` escaped; printf %q when it holds a `!`, which an
# interactive shell would expand even there.
shown_word() {
  local word="$1"
  if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$word"
  elif [[ "$word" == *!* ]]; then
    printf '%q' "$word"
  else
    word="${word//\\/\\\\}"
    word="${word//\"/\\\"}"
    word="${word//\$/\\\$}"
    word="${word//\`/\\\`}"
    printf '"%s"' "$word"
  fi
}

# Submits `runai submit <submit_flags> --command -- /bin/bash -c "source activate kiln && <command...>"`,
# or prints it with --dry-run (shell-quoted, ready to paste; the MLflow password as a reference to
# $MLFLOW_TRACKING_PASSWORD, not its value).
submit() {
  local job=()
  job_command "$@"
  local argv=(runai submit "${submit_flags[@]}" --command -- "${job[@]}")
  if [[ "$dry_run" == true ]]; then
    local shown=() arg
    for arg in "${argv[@]}"; do
      if [[ "$arg" == MLFLOW_TRACKING_PASSWORD=* ]]; then
        # shellcheck disable=SC2016 # printed for the user's shell to expand
        shown+=('MLFLOW_TRACKING_PASSWORD="$MLFLOW_TRACKING_PASSWORD"')
      else
        shown+=("$(shown_word "$arg")")
      fi
    done
    printf '%s\n' "${shown[*]}"
  else
    exec "${argv[@]}"
  fi
}
