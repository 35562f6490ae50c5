"""kiln's pipeline on Argo Workflows: data preparation -> training -> Optuna sweep -> batch inference.

Built with hera (the Argo Workflows Python SDK). Every step runs the kiln image made for it
(docker/kiln-*.Dockerfile) with the same command a user runs locally, on one PersistentVolumeClaim
mounted at /kiln-data that holds the data, checkpoints, logs and outputs of every step. It runs in the
namespace of deploy/k8s/ (kiln): the kiln-data volume, the kiln-postgres Secret (the Optuna study's URL)
and the MLflow server (http://mlflow-server-svc:5000) come from there.

    python deploy/argo/workflow.py --dry-run                        # print the Workflow manifest (YAML)
    python deploy/argo/workflow.py --dry-run | argo submit -        # or: kubectl create -f -
    ARGO_TOKEN=... python deploy/argo/workflow.py --server https://argo.example.com --run \\
        --params '{"epochs": 3, "image_tag": "0.1.1"}'              # submit over Argo's REST API
    python deploy/argo/workflow.py --server ... --run --debug       # training waits for a debugger
    python deploy/argo/workflow.py --server https://argo.example.com --run my-workflow.yaml \
        --params '{"batch_size": 2}'                                # submit your own Workflow file instead

--run FILE (the template guide's form) submits the Workflow in FILE instead of kiln's pipeline: it must be
one YAML document of kind Workflow (apiVersion argoproj.io/v1alpha1) that Argo's API models accept, every
field known to them; --params then sets the values of the parameters the file declares in
spec.arguments.parameters. It goes to --namespace if given, else to the file's metadata.namespace, else kiln.

--params sets the defaults of the Workflow's parameters (list them with --list-params); they stay
Workflow parameters, so `argo submit -p epochs=3` works on the printed manifest too. What changes the
manifest's shape (GPUs per training pod, the PVC, --debug) are options of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import yaml
from hera.workflows import Container, Parameter, RetryStrategy, SecretEnv, Steps, Workflow, WorkflowsService
from hera.workflows import models as m

DATA_ROOT = "/kiln-data"
VOLUME_NAME = "kiln-data"
DEBUG_PORT = 5678
# The Secret of deploy/k8s/mlflow/postgres-secret.yml: the Optuna study's database URL stays out of the manifest.
POSTGRES_SECRET = "kiln-postgres"
OPTUNA_STORAGE_KEY = "optuna-storage-url"
# The images' WORKDIR (docker/kiln-*.Dockerfile), where src/ and conf/ are; the debugger maps it.
IMAGE_WORKDIR = "/home/aisg/kiln"

PARAMETERS: dict[str, str] = {
    "registry": "registry.example.com/kiln",
    "image_tag": "0.1.0",
    "raw_data_dir": f"{DATA_ROOT}/data/raw",
    "processed_data_dir": f"{DATA_ROOT}/data/processed",
    "mlflow_tracking_uri": "http://mlflow-server-svc:5000",
    "mlflow_exp_name": "kiln",
    "epochs": "5",
    "lr": "1.3",
    "train_bs": "32",
    # The sweep: sweep_workers pods at once, each running n_trials trials of one shared PostgreSQL study.
    "study_name": "base-template",
    "n_trials": "3",
    "sweep_workers": "2",
    # Batch inference: empty model_path = the model trained by this workflow's training step.
    "model_path": "",
    "inference_input_dir": f"{DATA_ROOT}/data/raw/test",
    "inference_glob": "**/*.png",
}


def _param(name: str) -> str:
    return "{{workflow.parameters." + name + "}}"


def _image(purpose: str) -> str:
    return f"{_param('registry')}/{purpose}:{_param('image_tag')}"


WORKFLOW_NAME = "{{workflow.name}}"
WORKER = "{{inputs.parameters.worker}}"
# The workflow's own dirs on the volume: runs of the same workflow never overwrite each other.
MODELS_DIR = f"{DATA_ROOT}/models/{WORKFLOW_NAME}"
SWEEP_MODELS_DIR = f"{DATA_ROOT}/models/{WORKFLOW_NAME}-sweep"
LOG_DIR = f"{DATA_ROOT}/logs/{WORKFLOW_NAME}"
OUTPUTS_DIR = f"{DATA_ROOT}/outputs/{WORKFLOW_NAME}"


def _retry() -> RetryStrategy:
    # As in the template's Argo guide: retry up to 3 times whatever the failure (evicted pod, lost node,
    # OOM), with a growing pause so a flapping node or registry is not hammered.
    return RetryStrategy(
        limit="3", retry_policy="Always", backoff=m.Backoff(duration="30s", factor=m.IntOrString(root="2"))
    )


SHM_VOLUME = "dshm"


def _mounts() -> list[m.VolumeMount]:
    return [m.VolumeMount(name=VOLUME_NAME, mount_path=DATA_ROOT)]


def _tracking_overrides() -> list[str]:
    return [f"mlflow_tracking_uri={_param('mlflow_tracking_uri')}", f"mlflow_exp_name={_param('mlflow_exp_name')}"]


def _training_args() -> list[str]:
    return [
        f"data_dir_path={_param('processed_data_dir')}",
        f"epochs={_param('epochs')}",
        "no_cuda=false",
        *_tracking_overrides(),
    ]


def _gpu_resources(gpus: int) -> m.ResourceRequirements:
    # Literal quantities: Argo decodes `resources` as Kubernetes quantities before substituting
    # parameters, so a {{workflow.parameters.*}} there would be rejected at submission.
    gpu = m.Quantity(root=str(gpus))
    return m.ResourceRequirements(
        requests={"cpu": m.Quantity(root="4"), "memory": m.Quantity(root="16Gi"), "nvidia.com/gpu": gpu},
        limits={"memory": m.Quantity(root="16Gi"), "nvidia.com/gpu": gpu},
    )


def _cpu_resources(cpu: str, memory: str) -> m.ResourceRequirements:
    return m.ResourceRequirements(
        requests={"cpu": m.Quantity(root=cpu), "memory": m.Quantity(root=memory)},
        limits={"memory": m.Quantity(root=memory)},
    )


def _optuna_storage_env() -> SecretEnv:
    return SecretEnv(name="OPTUNA_STORAGE", secret_name=POSTGRES_SECRET, secret_key=OPTUNA_STORAGE_KEY)


BATCH_INFERENCE_SCRIPT = f"""set -euo pipefail
model_path='{_param("model_path")}'
if [ -z "$model_path" ]; then
  # The newest checkpoint the training step wrote (<artifact_dir_path>/<MLflow run id>/checkpoint.pt).
  model_path=$(ls -t {MODELS_DIR}/*/checkpoint.pt | head -n 1)
fi
exec python src/batch_inferencing.py "inference.model_path=$model_path" \\
  'inference.input_data_dir={_param("inference_input_dir")}' \\
  'inference.file_check_glob="{_param("inference_glob")}"' \\
  'hydra.run.dir={OUTPUTS_DIR}/batch-inference' 'log_dir={LOG_DIR}'
"""


def build_workflow(
    params: Mapping[str, object] | None = None,
    *,
    debug: bool = False,
    gpus: int = 1,
    pvc: str = VOLUME_NAME,
    namespace: str = "kiln",
    service_account: str | None = None,
) -> Workflow:
    """The pipeline as a hera Workflow; `params` override the defaults of PARAMETERS."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"Unknown workflow parameter(s) {unknown}; known: {sorted(PARAMETERS)}")
    values = {**PARAMETERS, **{key: str(value) for key, value in params.items()}}

    train_command = ["python", "src/train_model.py"]
    if gpus > 1:
        # One process per GPU training one model (data-parallel, NCCL); train_bs is per GPU.
        train_command = ["torchrun", "--standalone", f"--nproc-per-node={gpus}", "src/train_model.py"]
    train_ports = None
    if debug:
        train_command = ["python", "-m", "debugpy", "--listen", f"0.0.0.0:{DEBUG_PORT}", "--wait-for-client"]
        train_command += ["src/train_model.py"]
        train_ports = [m.ContainerPort(name="debug", container_port=DEBUG_PORT)]

    with Workflow(
        generate_name="kiln-pipeline-",
        namespace=namespace,
        entrypoint="pipeline",
        # The pods' identity: it needs Argo's executor permissions in the namespace (Argo's docs,
        # "Service Accounts"); None = the namespace's default service account.
        service_account_name=service_account,
        arguments=[Parameter(name=name, value=value) for name, value in values.items()],
        volumes=[
            m.Volume(name=VOLUME_NAME, persistent_volume_claim=m.PersistentVolumeClaimVolumeSource(claim_name=pvc)),
            # NCCL between the GPUs of one pod exchanges through /dev/shm, which containers cap at 64 MiB.
            *([m.Volume(name=SHM_VOLUME, empty_dir=m.EmptyDirVolumeSource(medium="Memory"))] if gpus > 1 else []),
        ],
        # uid/gid of the kiln images; fsGroup makes the volume writable for them.
        security_context=m.PodSecurityContext(run_as_user=2222, run_as_group=2222, fs_group=2222),
    ) as workflow:
        process_data = Container(
            name="process-data",
            image=_image("data-prep"),
            command=["python", "src/process_data.py"],
            args=[
                f"raw_data_dir_path={_param('raw_data_dir')}",
                f"processed_data_dir_path={_param('processed_data_dir')}",
                f"log_dir={LOG_DIR}",
                f"hydra.run.dir={OUTPUTS_DIR}/process-data",
            ],
            resources=_cpu_resources("4", "8Gi"),
            volume_mounts=_mounts(),
            retry_strategy=_retry(),
        )
        train = Container(
            name="train-model",
            image=_image("model-training-gpu"),
            command=train_command,
            args=[
                *_training_args(),
                f"lr={_param('lr')}",
                f"train_bs={_param('train_bs')}",
                f"artifact_dir_path={MODELS_DIR}",
                f"log_dir={LOG_DIR}",
                f"hydra.run.dir={OUTPUTS_DIR}/train-model",
            ],
            ports=train_ports,
            resources=_gpu_resources(gpus),
            volume_mounts=[*_mounts(), *([m.VolumeMount(name=SHM_VOLUME, mount_path="/dev/shm")] if gpus > 1 else [])],
            retry_strategy=_retry(),
        )
        # Workers creating Optuna's schema in a fresh database at the same moment collide: one step
        # creates the study first.
        create_study = Container(
            name="create-study",
            image=_image("model-training"),
            command=["optuna", "create-study", "--skip-if-exists"],
            # $(OPTUNA_STORAGE) is expanded by Kubernetes from the container's environment.
            args=[
                "--storage",
                "$(OPTUNA_STORAGE)",
                "--study-name",
                _param("study_name"),
                "--directions",
                "minimize",
                "maximize",
            ],
            env=[_optuna_storage_env()],
            resources=_cpu_resources("250m", "512Mi"),
            retry_strategy=_retry(),
        )
        sweep_worker = Container(
            name="sweep-worker",
            inputs=[Parameter(name="worker")],
            image=_image("model-training-gpu"),
            command=["python", "src/train_model.py", "--multirun"],
            args=[
                # Quoted for Hydra: a password may hold characters its override grammar reserves.
                "hydra.sweeper.storage='$(OPTUNA_STORAGE)'",
                f"hydra.sweeper.study_name={_param('study_name')}",
                f"hydra.sweeper.n_trials={_param('n_trials')}",
                f"hydra.sweep.dir={OUTPUTS_DIR}/sweep/worker-{WORKER}",
                *_training_args(),
                f"artifact_dir_path={SWEEP_MODELS_DIR}",
                f"log_dir={LOG_DIR}/sweep-worker-{WORKER}",
            ],
            # One tag for all workers' trials: `tags.hptuning_tag = "<workflow name>"` in MLflow's search.
            env=[_optuna_storage_env(), m.EnvVar(name="MLFLOW_HPTUNING_TAG", value=WORKFLOW_NAME)],
            resources=_gpu_resources(gpus),
            volume_mounts=_mounts(),
            retry_strategy=_retry(),
        )
        batch_inference = Container(
            name="batch-inference",
            image=_image("batch-inference"),
            command=["/bin/bash", "-c", BATCH_INFERENCE_SCRIPT],
            env=[m.EnvVar(name="MLFLOW_TRACKING_URI", value=_param("mlflow_tracking_uri"))],
            resources=_cpu_resources("4", "8Gi"),
            volume_mounts=_mounts(),
            retry_strategy=_retry(),
        )
        with Steps(name="pipeline"):
            process_data(name="prepare-data")
            train(name="train")
            create_study(name="create-study")
            sweep_worker(
                name="sweep",
                arguments={"worker": "{{item}}"},
                with_sequence=m.Sequence(count=m.IntOrString(root=_param("sweep_workers"))),
            )
            batch_inference(name="batch-inference")
    return workflow


def debug_instructions(namespace: str, workflow_name: str = "<workflow name>") -> str:
    return f"""Debugging: the training step starts under debugpy and waits on port {DEBUG_PORT} for a client.
  1. Find its pod and forward the port (once the step is Running):
       kubectl -n {namespace} get pods -l workflows.argoproj.io/workflow={workflow_name}
       kubectl -n {namespace} port-forward pod/<train pod> {DEBUG_PORT}:{DEBUG_PORT}
  2. Attach VS Code ("Python Debugger: Remote Attach") with this launch configuration:
       {{"name": "kiln: attach to Argo training", "type": "debugpy", "request": "attach",
        "connect": {{"host": "localhost", "port": {DEBUG_PORT}}},
        "pathMappings": [{{"localRoot": "${{workspaceFolder}}", "remoteRoot": "{IMAGE_WORKDIR}"}}],
        "justMyCode": false}}
  Training starts when the debugger attaches; breakpoints in src/ and python/kiln work."""


def _server_url(server: str) -> str:
    # The template's guide names the server by host (`--server abacus`); Argo serves HTTPS by default.
    return server if server.startswith(("http://", "https://")) else f"https://{server}"


def _parse_params(text: str | None) -> tuple[dict[str, object], bool]:
    if not text:
        return {}, False
    try:
        params = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--params must be a JSON object, e.g. '{{\"epochs\": 3}}': {error}") from None
    if not isinstance(params, dict):
        raise SystemExit(f"--params must be a JSON object, e.g. '{{\"epochs\": 3}}', got {text!r}")
    # The template's guide turns debugging on with --params '{"debug": "true"}'; --debug is the same.
    debug = str(params.pop("debug", "false")).lower() in ("1", "true", "yes")
    return params, debug


def _unknown_fields(given: object, known: object, path: str) -> Iterator[str]:
    """Keys of `given` that `known` (the same manifest after Argo's API models read it) no longer has."""
    if isinstance(given, dict) and isinstance(known, dict):
        for key, value in given.items():
            if key not in known:
                yield f"{path}.{key}"
            else:
                yield from _unknown_fields(value, known[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(known, list):
        for index, (value, known_value) in enumerate(zip(given, known, strict=True)):
            yield from _unknown_fields(value, known_value, f"{path}[{index}]")


def load_workflow_file(path: Path) -> m.Workflow:
    """The Workflow in a YAML file, checked against Argo's API models (hera's); ValueError says what is wrong."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file; --run FILE takes the path of a Workflow YAML file")
    try:
        documents = [document for document in yaml.safe_load_all(path.read_text(encoding="utf-8")) if document]
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise ValueError(f"{path} must hold one Workflow (a YAML mapping), found {len(documents)} document(s)")
    manifest = documents[0]
    kind = (manifest.get("apiVersion"), manifest.get("kind"))
    if kind != ("argoproj.io/v1alpha1", "Workflow"):
        raise ValueError(
            f"{path} is apiVersion {kind[0]!r}, kind {kind[1]!r}; --run submits a Workflow "
            "(apiVersion: argoproj.io/v1alpha1, kind: Workflow)"
        )
    try:
        workflow = m.Workflow.model_validate(manifest)
    except ValueError as error:  # pydantic's ValidationError
        raise ValueError(f"{path} is not a valid Argo Workflow: {error}") from None
    # Argo's models ignore fields they do not have: a misspelt field would be dropped without a word.
    unknown = list(_unknown_fields(manifest, workflow.model_dump(mode="json", by_alias=True, exclude_unset=True), ""))
    if unknown:
        raise ValueError(f"{path}: Argo Workflows has no field(s) {[field.lstrip('.') for field in unknown]}")
    return workflow


def set_file_parameters(workflow: m.Workflow, params: Mapping[str, object], path: Path) -> None:
    """Sets the values of parameters the file declares (spec.arguments.parameters), as `argo submit -p` does."""
    declared = {
        parameter.name: parameter
        for parameter in (workflow.spec.arguments and workflow.spec.arguments.parameters) or []
    }
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ValueError(f"{path} declares no parameter(s) {unknown}; it declares: {sorted(declared)}")
    for name, value in params.items():
        declared[name].value = str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="kiln's pipeline (prepare -> train -> sweep -> batch inference) on Argo Workflows."
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--dry-run", action="store_true", help="print the Workflow manifest as YAML (the default)")
    action.add_argument(
        "--run",
        nargs="?",
        const=True,
        metavar="FILE",
        help="submit kiln's pipeline to --server, or the Workflow in the YAML file FILE",
    )
    action.add_argument("--list-params", action="store_true", help="print the parameters and their defaults")
    parser.add_argument("--server", help="Argo server URL, e.g. https://argo.example.com:2746 (https:// if omitted)")
    parser.add_argument(
        "--namespace",
        help="namespace to run in, the one of deploy/k8s/ (its volume, Secrets and MLflow server); default: kiln "
        "(for --run FILE: the file's metadata.namespace if it has one)",
    )
    parser.add_argument("--params", help='JSON object of parameter values, e.g. \'{"epochs": 3, "lr": 1.0}\'')
    parser.add_argument("--debug", action="store_true", help="start training under debugpy, waiting for a client")
    parser.add_argument(
        "--gpus",
        type=int,
        help="GPUs per training/sweep pod (default: 1); with more than 1 the training step runs "
        "torchrun --nproc-per-node GPUS (data-parallel, one process per GPU)",
    )
    parser.add_argument("--pvc", help=f"PersistentVolumeClaim mounted at {DATA_ROOT} (default: {VOLUME_NAME})")
    parser.add_argument("--service-account", help="service account of the workflow's pods (default: the namespace's)")
    parser.add_argument(
        "--token-env", default="ARGO_TOKEN", help="environment variable holding the Argo token (default: ARGO_TOKEN)"
    )
    parser.add_argument("--insecure", action="store_true", help="do not verify the server's TLS certificate")
    args = parser.parse_args(argv)

    if args.list_params:
        for name, value in PARAMETERS.items():
            print(f"{name}: {value!r}")
        return 0
    if isinstance(args.run, str):
        shaping = [
            option
            for option, value in (
                ("--debug", args.debug),
                ("--gpus", args.gpus),
                ("--pvc", args.pvc),
                ("--service-account", args.service_account),
            )
            if value
        ]
        if shaping:
            parser.error(f"{', '.join(shaping)} only shape(s) kiln's pipeline; with --run FILE, set that in the file")
        return _submit_file(parser, args)

    params, debug_param = _parse_params(args.params)
    debug = args.debug or debug_param
    args.namespace = args.namespace or "kiln"
    try:
        workflow = build_workflow(
            params,
            debug=debug,
            gpus=1 if args.gpus is None else args.gpus,
            pvc=args.pvc or VOLUME_NAME,
            namespace=args.namespace,
            service_account=args.service_account,
        )
    except ValueError as error:
        parser.error(str(error))

    if not args.run:
        print(workflow.to_yaml(), end="")
        if debug:
            print(debug_instructions(args.namespace), file=sys.stderr)
        return 0

    server = _server_url(_need_server(parser, args))
    workflow.workflows_service = _service(server, args)
    try:
        created = workflow.create()
    except Exception as error:  # hera raises its own exception types per HTTP status
        print(f"Submitting to {server} (namespace {args.namespace}) failed: {error}", file=sys.stderr)
        return 1
    name = created.metadata.name
    print(f"Submitted workflow {name}: {server.rstrip('/')}/workflows/{args.namespace}/{name}")
    if debug:
        print(debug_instructions(args.namespace, name))
    return 0


def _need_server(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    if not args.server:
        parser.error("--run needs --server, the Argo server's URL")
    return args.server


def _service(server: str, args: argparse.Namespace) -> WorkflowsService:
    return WorkflowsService(
        host=server,
        token=os.environ.get(args.token_env) or None,
        namespace=args.namespace,
        verify_ssl=not args.insecure,
    )


def _submit_file(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """--run FILE: the given Workflow, checked, with --params set, submitted as it is otherwise."""
    path = Path(args.run)
    params = {}
    if args.params:
        try:
            params = json.loads(args.params)
        except json.JSONDecodeError as error:
            parser.error(f"--params must be a JSON object, e.g. '{{\"epochs\": 3}}': {error}")
        if not isinstance(params, dict):
            parser.error(f"--params must be a JSON object, e.g. '{{\"epochs\": 3}}', got {args.params!r}")
    try:
        workflow = load_workflow_file(path)
        set_file_parameters(workflow, params, path)
    except ValueError as error:
        parser.error(str(error))
    server = _server_url(_need_server(parser, args))
    args.namespace = args.namespace or workflow.metadata.namespace or "kiln"
    workflow.metadata.namespace = args.namespace
    try:
        created = _service(server, args).create_workflow(
            m.WorkflowCreateRequest(workflow=workflow, namespace=args.namespace)
        )
    except Exception as error:  # hera raises its own exception types per HTTP status
        print(f"Submitting {path} to {server} (namespace {args.namespace}) failed: {error}", file=sys.stderr)
        return 1
    name = created.metadata.name
    print(f"Submitted workflow {name} ({path}): {server.rstrip('/')}/workflows/{args.namespace}/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
