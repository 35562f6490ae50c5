"""Orchestration files: Polyaxon components, the Argo workflow, Kubernetes manifests and MLflow Projects.

Each file is checked with the parser or schema of the platform that runs it (Polyaxon's own spec parser,
the models of Argo's API client, Kubernetes 1.30's JSON schemas), and every kiln command in it is composed
against kiln's real Hydra configs, so a renamed key or a mistyped override fails here, not on a cluster.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import REPO

KUBERNETES_VERSION = "1.30"
POLYAXON = REPO / "deploy" / "polyaxon"
ARGO_WORKFLOW = REPO / "deploy" / "argo" / "workflow.py"
K8S = REPO / "deploy" / "k8s"
MLFLOW_K8S = REPO / "deploy" / "mlflow-k8s"
APPS = {"process_data.py": "process_data", "train_model.py": "train_model", "batch_inferencing.py": "batch_inferencing"}


# ---------------------------------------------------------------------------------------------------------
# Helpers: kiln's commands against its Hydra configs


def hydra_config(command: list[str]):
    """Compose the config a kiln app would run with for `command` (``python src/<app>.py [overrides]``)."""
    from hydra import compose, initialize_config_dir

    from kiln.cli import accept_app_prefixed_overrides

    script = next(index for index, token in enumerate(command) if Path(token).name in APPS)
    app = APPS[Path(command[script]).name]
    overrides = [token for token in command[script + 1 :] if token != "--multirun"]
    argv = ["app", *overrides]
    accept_app_prefixed_overrides(app, argv)
    # version_base=None, as the apps have it (Hydra 1.4 reports it as deprecated).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The version_base parameter is deprecated")
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            return compose(config_name=app, overrides=argv[1:], return_hydra_config=True)


def python_command(script: str, values: dict[str, str]) -> list[str]:
    """The words of the ``python src/...`` command inside a shell script, with its variables set."""
    line = script[script.index("python src/") :].replace("\\\n", " ")
    for name, value in values.items():
        line = line.replace(f"${name}", value)
    return shlex.split(line)


def k8s_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\((\w+)\)", lambda match: env[match[1]], text)


def load_yaml_documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


# ---------------------------------------------------------------------------------------------------------
# Polyaxon


def render_polyaxonfile(path: Path, params: dict | None = None):
    """Validate with Polyaxon's parser, then resolve inputs and contexts as the platform does at run time."""
    from polyaxon.polyaxonfile import check_polyaxonfile
    from polyaxon.polyaxonfile.specs import CompiledOperationSpecification, OperationSpecification

    operation = check_polyaxonfile(polyaxonfile=str(path), params=params, is_cli=False, verbose=False)
    compiled = OperationSpecification.compile_operation(operation)
    op_params = {name: param.to_dict() for name, param in (operation.params or {}).items()}
    compiled = CompiledOperationSpecification.apply_params(compiled, params=op_params)
    compiled = CompiledOperationSpecification.apply_operation_contexts(compiled)
    ports = getattr(compiled.run, "ports", None)
    contexts = {"globals": {"uuid": "5e1f00d", "ports": ports, "base_url": "/services/v1/kiln/5e1f00d"}}
    return CompiledOperationSpecification.apply_runtime_contexts(compiled, contexts=contexts)


POLYAXON_SPECS = {
    "process-data.yml": "job",
    "train-model-gpu.yml": "job",
    "train-model-gpu-hptuning.yml": "job",
    "vscode-service.yml": "service",
    "jupyter-service.yml": "service",
}


def test_polyaxon_specs_are_the_template_components():
    assert sorted(path.name for path in POLYAXON.glob("*.yml")) == sorted(POLYAXON_SPECS)


@pytest.mark.parametrize("name", sorted(POLYAXON_SPECS))
def test_polyaxon_spec_is_a_valid_v1_1_component_on_the_persistent_volume(name):
    spec = yaml.safe_load((POLYAXON / name).read_text())
    assert spec["version"] == 1.1 and spec["kind"] == "component"
    compiled = render_polyaxonfile(POLYAXON / name)
    assert compiled.run.kind == POLYAXON_SPECS[name]
    container = compiled.run.container
    assert container.image.startswith("registry.example.com/kiln/") and container.image.endswith(":0.1.0")
    claims = [volume.persistent_volume_claim["claimName"] for volume in compiled.run.volumes]
    assert claims == ["polyaxon-v1-data"]
    assert [mount["mountPath"] for mount in container.volume_mounts] == ["/polyaxon-v1-data"]


def test_polyaxon_parser_rejects_a_mistyped_spec(tmp_path):
    # The check above means something: Polyaxon refuses a container field that Kubernetes does not have.
    spec = yaml.safe_load((POLYAXON / "train-model-gpu.yml").read_text())
    spec["run"]["container"]["resource"] = spec["run"]["container"].pop("resources")
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump(spec))
    from polyaxon.exceptions import PolyaxonfileError

    with pytest.raises(PolyaxonfileError):
        render_polyaxonfile(broken)


@pytest.mark.parametrize(
    ("params", "raw"),
    [
        # The guide's form: -P RAW_DATA_DIRS='["..."]', a JSON list on the command line.
        (
            {"RAW_DATA_DIRS": '["/polyaxon-v1-data/workspaces/ana/data/set1", "/polyaxon-v1-data/workspaces/ana/s 2"]'},
            ["/polyaxon-v1-data/workspaces/ana/data/set1", "/polyaxon-v1-data/workspaces/ana/s 2"],
        ),
        ({}, ["/polyaxon-v1-data/data/raw"]),
        ({"RAW_DATA_DIR": "/polyaxon-v1-data/workspaces/ana/data/raw"}, "/polyaxon-v1-data/workspaces/ana/data/raw"),
    ],
    ids=["raw-data-dirs", "default", "raw-data-dir"],
)
def test_polyaxon_data_prep_runs_process_data_with_the_given_dirs(params, raw):
    compiled = render_polyaxonfile(
        POLYAXON / "process-data.yml", {**params, "PROCESSED_DATA_DIR": "/polyaxon-v1-data/p"}
    )
    container = compiled.run.container
    assert container.working_dir == "/home/aisg/kiln"  # the guides' --working-dir /home/aisg/<repo>
    config = hydra_config([*container.command, *container.args])
    assert config.raw_data_dir_path == raw
    assert config.processed_data_dir_path == "/polyaxon-v1-data/p"


def test_polyaxon_training_runs_train_model_on_a_gpu_with_the_given_params():
    compiled = render_polyaxonfile(
        POLYAXON / "train-model-gpu.yml",
        {"EPOCHS": 3, "LR": 0.9, "MLFLOW_TRACKING_URI": "http://10.0.0.7:5000", "MLFLOW_EXP_NAME": "ana-exp"},
    )
    container = compiled.run.container
    config = hydra_config([*container.command, *container.args])
    assert (config.epochs, config.lr, config.train_bs) == (3, 0.9, 32)
    assert (config.mlflow_tracking_uri, config.mlflow_exp_name) == ("http://10.0.0.7:5000", "ana-exp")
    assert config.setup_mlflow is True and config.resume is False and config.no_cuda is False
    assert config.data_dir_path == "/polyaxon-v1-data/data/processed"
    assert config.hydra.run.dir == "/polyaxon-v1-data/outputs/5e1f00d"
    assert container.resources["limits"]["nvidia.com/gpu"] == 1
    to_env = {io.name: io.to_env for io in compiled.inputs if io.to_env}
    assert to_env == {
        "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
    }


def run_with_recording_shims(script: str, tmp_path: Path, programs: list[str], env: dict[str, str]) -> list[list[str]]:
    """Runs a spec's bash script with stand-ins for `programs` first on PATH; each records its argv and
    MLFLOW_HPTUNING_TAG and exits 0. Returns the calls in order: [program, *args, tag]."""
    shims = tmp_path / "bin"
    shims.mkdir()
    calls = tmp_path / "calls.jsonl"
    for program in programs:
        shim = shims / program
        shim.write_text(
            f"#!{sys.executable}\nimport json, os, sys\n"
            f"with open({str(calls)!r}, 'a') as out:\n"
            "    out.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:], "
            "os.environ.get('MLFLOW_HPTUNING_TAG')]) + '\\n')\n"
        )
        shim.chmod(0o755)
    done = subprocess.run(
        ["/bin/bash", "-c", script],
        env={**os.environ, **env, "PATH": f"{shims}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in calls.read_text().splitlines()]


def test_polyaxon_sweep_defaults_to_the_guides_in_memory_study_tagged_with_the_start_time(tmp_path):
    compiled = render_polyaxonfile(POLYAXON / "train-model-gpu-hptuning.yml", {"N_TRIALS": 10})
    container = compiled.run.container
    assert container.command == ["/bin/bash", "-c"]
    inputs = {io.name: io for io in compiled.inputs}
    assert inputs["OPTUNA_STORAGE"].value == "" and inputs["MLFLOW_HPTUNING_TAG"].value == ""
    before = int(time.time())
    # Polyaxon sets each toEnv input's value in the environment, the empty defaults included.
    calls = run_with_recording_shims(
        container.args[0], tmp_path, ["python", "optuna"], {"OPTUNA_STORAGE": "", "MLFLOW_HPTUNING_TAG": ""}
    )
    [(program, *command, tag)] = calls  # no `optuna create-study`: nothing shared to create
    assert program == "python" and command[:2] == ["src/train_model.py", "--multirun"]
    assert before <= int(tag) <= time.time()  # the guide's MLFLOW_HPTUNING_TAG="$(date +%s)"
    config = hydra_config(command)
    assert config.hydra.sweeper.storage is None
    assert (config.hydra.sweeper.study_name, config.hydra.sweeper.n_trials) == ("base-template", 10)
    assert config.hydra.sweeper.direction == ["minimize", "maximize"]
    assert config.hydra.sweep.dir == "/polyaxon-v1-data/multirun/5e1f00d"
    assert container.resources["limits"]["nvidia.com/gpu"] == 1


def test_polyaxon_sweep_with_shared_storage_creates_the_study_then_joins_it(tmp_path):
    storage = "postgresql://kiln:p@ss=w0rd@kiln-postgres:5432/optuna"
    compiled = render_polyaxonfile(
        POLYAXON / "train-model-gpu-hptuning.yml",
        {"N_TRIALS": 10, "STUDY_NAME": "ana-study", "OPTUNA_STORAGE": storage, "MLFLOW_HPTUNING_TAG": "1641159546"},
    )
    to_env = {io.name: io.to_env for io in compiled.inputs if io.to_env}
    assert to_env["MLFLOW_HPTUNING_TAG"] == "MLFLOW_HPTUNING_TAG" and to_env["OPTUNA_STORAGE"] == "OPTUNA_STORAGE"
    calls = run_with_recording_shims(
        compiled.run.container.args[0],
        tmp_path,
        ["python", "optuna"],
        {"OPTUNA_STORAGE": storage, "MLFLOW_HPTUNING_TAG": "1641159546"},
    )
    create_study, sweep = calls
    assert create_study == [
        "optuna", "create-study", "--skip-if-exists", "--storage", storage,
        "--study-name", "ana-study", "--directions", "minimize", "maximize", "1641159546",
    ]  # fmt: skip
    config = hydra_config(sweep[1:-1])
    assert sweep[-1] == "1641159546"
    assert config.hydra.sweeper.storage == storage
    assert (config.hydra.sweeper.study_name, config.hydra.sweeper.n_trials) == ("ana-study", 10)


def test_polyaxon_workspaces_serve_on_their_service_port():
    vscode = render_polyaxonfile(POLYAXON / "vscode-service.yml", {"WORKING_DIR": "/polyaxon-v1-data/workspaces/ana"})
    assert vscode.run.ports == [8080]
    assert vscode.run.container.command == ["code-server"]
    assert vscode.run.container.args[:2] == ["--bind-addr", "0.0.0.0:8080"]
    assert vscode.run.container.args[-1] == "/polyaxon-v1-data/workspaces/ana"

    jupyter = render_polyaxonfile(POLYAXON / "jupyter-service.yml")
    assert jupyter.run.ports == [8888]
    assert jupyter.run.container.command == ["jupyter", "lab"]
    assert {"--ip=0.0.0.0", "--port=8888", "--ServerApp.base_url=/services/v1/kiln/5e1f00d"} <= set(
        jupyter.run.container.args
    )


@pytest.mark.parametrize("name", ["vscode-service.yml", "jupyter-service.yml"])
def test_polyaxon_workspaces_set_up_permissions_and_keep_the_environment_on_the_volume(name, tmp_path):
    workspace = tmp_path / "polyaxon-v1-data" / "workspaces" / "ana"
    compiled = render_polyaxonfile(POLYAXON / name, {"WORKING_DIR": str(workspace)})
    security = compiled.run.environment.security_context
    assert (security.run_as_user, security.run_as_group) == (2222, 2222)
    [init] = compiled.run.init
    assert init.container.security_context["runAsUser"] == 0
    assert init.container.volume_mounts == compiled.run.container.volume_mounts
    # The guide's by-hand `sudo mkdir -p .../workspaces/<YOUR_NAME>; sudo chown 2222:2222`, run for real.
    if os.geteuid() != 0:
        pytest.skip("chown to uid 2222 needs root, as in the init container")
    done = subprocess.run([*init.container.command, *init.container.args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for path in (workspace, workspace / "conda_envs", workspace / ".workspace"):
        assert (path.stat().st_uid, path.stat().st_gid) == (2222, 2222), path

    env = {item["name"]: item["value"] for item in compiled.run.container.env}
    assert env["CONDA_ENVS_PATH"] == f"{workspace}/conda_envs"  # the guide's conda_envs/, found by name
    for variable in ("CONDA_PKGS_DIRS", "PYTHONUSERBASE", "PIP_CACHE_DIR"):
        assert env[variable].startswith(f"{workspace}/.workspace/"), variable
    editor = {"vscode-service.yml": ["XDG_DATA_HOME"], "jupyter-service.yml": ["JUPYTER_CONFIG_DIR", "IPYTHONDIR"]}
    for variable in editor[name]:
        assert env[variable].startswith(f"{workspace}/.workspace/"), variable


# ---------------------------------------------------------------------------------------------------------
# Argo Workflows


@pytest.fixture(scope="module")
def argo():
    spec = importlib.util.spec_from_file_location("kiln_argo_workflow", ARGO_WORKFLOW)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_workflow_py(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ARGO_WORKFLOW), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def argo_schema_problems(manifest: dict) -> list[str]:
    """Problems of a Workflow manifest per Argo's API, as its official Python client (argo-workflows,
    generated from Argo's OpenAPI spec) models it: wrong types and missing required fields raise, and
    fields the API does not have are listed."""
    from argo_workflows.configuration import Configuration
    from argo_workflows.model.io_argoproj_workflow_v1alpha1_workflow import IoArgoprojWorkflowV1alpha1Workflow
    from argo_workflows.model_utils import ModelNormal, validate_and_convert_types

    configuration = Configuration()
    configuration.discard_unknown_keys = False
    workflow_type = (IoArgoprojWorkflowV1alpha1Workflow,)
    validate_and_convert_types(copy.deepcopy(manifest), workflow_type, ["workflow"], True, True, configuration)

    def unknown_fields(value, types, path) -> Iterator[str]:
        for kind in types:
            if isinstance(kind, list) and isinstance(value, list):
                for index, item in enumerate(value):
                    yield from unknown_fields(item, tuple(kind), f"{path}[{index}]")
            elif isinstance(kind, dict) and isinstance(value, dict):
                for key, item in value.items():
                    yield from unknown_fields(item, kind[str], f"{path}.{key}")
            elif isinstance(kind, type) and issubclass(kind, ModelNormal) and isinstance(value, dict):
                fields = {json_name: name for name, json_name in kind.attribute_map.items()}
                for key, item in value.items():
                    if key not in fields:
                        yield f"{path}.{key}"
                    else:
                        yield from unknown_fields(item, kind.openapi_types[fields[key]], f"{path}.{key}")

    return list(unknown_fields(manifest, workflow_type, "workflow"))


def argo_substitute(text: str, parameters: dict[str, str], worker: str = "0") -> str:
    """What Argo's templating makes of a template's text for a workflow named kiln-pipeline-x7k2p."""
    text = re.sub(r"\{\{workflow\.parameters\.(\w+)\}\}", lambda match: parameters[match[1]], text)
    return text.replace("{{workflow.name}}", "kiln-pipeline-x7k2p").replace("{{inputs.parameters.worker}}", worker)


def workflow_parameters(manifest: dict) -> dict[str, str]:
    return {parameter["name"]: parameter["value"] for parameter in manifest["spec"]["arguments"]["parameters"]}


def templates(manifest: dict) -> dict[str, dict]:
    return {template["name"]: template for template in manifest["spec"]["templates"]}


def test_argo_dry_run_prints_a_workflow_that_argo_and_kubernetes_accept():
    result = run_workflow_py("--dry-run")
    assert result.returncode == 0, result.stderr
    manifest = yaml.safe_load(result.stdout)
    assert (manifest["apiVersion"], manifest["kind"]) == ("argoproj.io/v1alpha1", "Workflow")
    assert argo_schema_problems(manifest) == []
    # Each step's pod, as Kubernetes will get it, against Kubernetes' own (strict) schema.
    for template in manifest["spec"]["templates"]:
        if "container" in template:
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": template["name"]},
                "spec": {
                    "containers": [{"name": "main", **template["container"]}],
                    "volumes": manifest["spec"]["volumes"],
                    "securityContext": manifest["spec"]["securityContext"],
                },
            }
            kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_argo_schema_check_reports_mistakes(argo):
    manifest = argo.build_workflow().to_dict()
    manifest["spec"]["templates"][0]["retryStrategy"]["limits"] = "3"
    manifest["spec"]["templates"][1]["container"]["resource"] = {}
    assert argo_schema_problems(manifest) == [
        "workflow.spec.templates[0].retryStrategy.limits",
        "workflow.spec.templates[1].container.resource",
    ]
    manifest = argo.build_workflow().to_dict()
    del manifest["spec"]["templates"][0]["container"]["image"]
    with pytest.raises(TypeError, match="image"):
        argo_schema_problems(manifest)


def test_argo_pipeline_prepares_trains_sweeps_then_infers(argo):
    manifest = argo.build_workflow({"epochs": 3, "lr": 0.9, "image_tag": "0.2.0"}).to_dict()
    steps = [[step["name"] for step in group] for group in templates(manifest)["pipeline"]["steps"]]
    assert steps == [["prepare-data"], ["train"], ["create-study"], ["sweep"], ["batch-inference"]]
    parameters = workflow_parameters(manifest)
    assert (parameters["epochs"], parameters["lr"], parameters["image_tag"]) == ("3", "0.9", "0.2.0")

    by_name = templates(manifest)
    images = {
        name: argo_substitute(by_name[name]["container"]["image"], parameters) for name in by_name if name != "pipeline"
    }
    assert images == {
        "process-data": "registry.example.com/kiln/data-prep:0.2.0",
        "train-model": "registry.example.com/kiln/model-training-gpu:0.2.0",
        "create-study": "registry.example.com/kiln/model-training:0.2.0",
        "sweep-worker": "registry.example.com/kiln/model-training-gpu:0.2.0",
        "batch-inference": "registry.example.com/kiln/batch-inference:0.2.0",
    }
    for name, template in by_name.items():
        if name != "pipeline":
            assert template["retryStrategy"]["limit"] == "3", name
    for name in ("train-model", "sweep-worker"):
        resources = by_name[name]["container"]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    for name in ("process-data", "train-model", "sweep-worker", "batch-inference"):
        assert by_name[name]["container"]["volumeMounts"] == [{"name": "kiln-data", "mountPath": "/kiln-data"}]
    assert manifest["spec"]["volumes"] == [{"name": "kiln-data", "persistentVolumeClaim": {"claimName": "kiln-data"}}]
    assert (
        argo.build_workflow(gpus=2).to_dict()["spec"]["templates"][1]["container"]["resources"]["limits"][
            "nvidia.com/gpu"
        ]
        == "2"
    )


def test_argo_steps_run_kiln_commands_that_hydra_accepts(argo):
    manifest = argo.build_workflow({"epochs": 3, "study_name": "ana-study", "n_trials": 4}).to_dict()
    parameters = workflow_parameters(manifest)
    storage = "postgresql://kiln:pw@kiln-postgres:5432/optuna"
    by_name = templates(manifest)

    def command(name: str, worker: str = "0") -> list[str]:
        container = by_name[name]["container"]
        words = [*container["command"], *container.get("args", [])]
        return [k8s_expand(argo_substitute(word, parameters, worker), {"OPTUNA_STORAGE": storage}) for word in words]

    prepared = hydra_config(command("process-data"))
    assert prepared.processed_data_dir_path == "/kiln-data/data/processed"
    trained = hydra_config(command("train-model"))
    assert (trained.epochs, trained.data_dir_path, trained.no_cuda) == (3, "/kiln-data/data/processed", False)
    assert trained.mlflow_tracking_uri == "http://mlflow-server-svc:5000"
    assert trained.artifact_dir_path == "/kiln-data/models/kiln-pipeline-x7k2p"

    assert command("create-study") == [
        "optuna", "create-study", "--skip-if-exists", "--storage", storage,
        "--study-name", "ana-study", "--directions", "minimize", "maximize",
    ]  # fmt: skip
    sweep_step = next(group[0] for group in by_name["pipeline"]["steps"] if group[0]["name"] == "sweep")
    assert sweep_step["withSequence"]["count"] == "{{workflow.parameters.sweep_workers}}"
    workers = [hydra_config(command("sweep-worker", worker)) for worker in ("0", "1")]
    for worker in workers:
        assert worker.hydra.sweeper.storage == storage
        assert (worker.hydra.sweeper.study_name, worker.hydra.sweeper.n_trials) == ("ana-study", 4)
    assert workers[0].hydra.sweep.dir != workers[1].hydra.sweep.dir
    sweep_env = {env["name"]: env for env in by_name["sweep-worker"]["container"]["env"]}
    assert sweep_env["OPTUNA_STORAGE"]["valueFrom"]["secretKeyRef"] == {
        "name": "kiln-postgres",
        "key": "optuna-storage-url",
    }
    assert sweep_env["MLFLOW_HPTUNING_TAG"]["value"] == "{{workflow.name}}"

    script = argo_substitute(by_name["batch-inference"]["container"]["command"][2], parameters)
    assert "ls -t /kiln-data/models/kiln-pipeline-x7k2p/*/checkpoint.pt" in script
    inferred = hydra_config(
        python_command(script, {"model_path": "/kiln-data/models/kiln-pipeline-x7k2p/r1/checkpoint.pt"})
    )
    assert inferred.inference.model_path == "/kiln-data/models/kiln-pipeline-x7k2p/r1/checkpoint.pt"
    assert (inferred.inference.input_data_dir, inferred.inference.file_check_glob) == (
        "/kiln-data/data/raw/test",
        "**/*.png",
    )


def test_argo_rejects_unknown_params():
    result = run_workflow_py("--dry-run", "--params", '{"epoch": 3}')
    assert result.returncode == 2
    assert "Unknown workflow parameter(s) ['epoch']" in result.stderr and "'epochs'" in result.stderr


def test_argo_debug_starts_training_under_debugpy_and_says_how_to_attach():
    result = run_workflow_py("--dry-run", "--debug", "--namespace", "kiln")
    assert result.returncode == 0, result.stderr
    manifest = yaml.safe_load(result.stdout)
    by_name = templates(manifest)
    train = by_name["train-model"]["container"]
    assert train["command"] == [
        "python", "-m", "debugpy", "--listen", "0.0.0.0:5678", "--wait-for-client", "src/train_model.py",
    ]  # fmt: skip
    assert train["ports"] == [{"name": "debug", "containerPort": 5678}]
    assert by_name["sweep-worker"]["container"]["command"][:2] == ["python", "src/train_model.py"]
    assert "kubectl -n kiln port-forward pod/<train pod> 5678:5678" in result.stderr
    assert '"remoteRoot": "/home/aisg/kiln"' in result.stderr
    # The template guide's spelling, --params '{"debug": "true"}', does the same.
    seeded = yaml.safe_load(run_workflow_py("--dry-run", "--params", '{"debug": "true"}').stdout)
    assert templates(seeded)["train-model"]["container"]["command"][:3] == ["python", "-m", "debugpy"]


class ArgoServerStandIn(BaseHTTPRequestHandler):
    """Answers POST /api/v1/workflows/<namespace> as Argo's server does: the created Workflow."""

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.received.append({"path": self.path, "headers": dict(self.headers), "body": body})
        workflow = body["workflow"]
        created = {**workflow, "metadata": {**workflow["metadata"], "name": "kiln-pipeline-x7k2p", "uid": "1"}}
        payload = json.dumps(created).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_argo_run_submits_the_workflow_to_the_argo_server_api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ArgoServerStandIn)
    server.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        params = '{"epochs": 3, "image_tag": "0.2.0"}'
        result = run_workflow_py(
            "--server", url, "--run", "--namespace", "kiln", "--params", params, env={"ARGO_TOKEN": "s3cr3t"}
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr
    assert f"Submitted workflow kiln-pipeline-x7k2p: {url}/workflows/kiln/kiln-pipeline-x7k2p" in result.stdout
    [request] = server.received
    assert request["path"] == "/api/v1/workflows/kiln"
    assert request["headers"]["Authorization"] == "Bearer s3cr3t"
    expected = yaml.safe_load(run_workflow_py("--dry-run", "--namespace", "kiln", "--params", params).stdout)
    assert request["body"]["workflow"] == expected
    assert workflow_parameters(request["body"]["workflow"])["epochs"] == "3"


# The template guide's own form: `workflow.py --server abacus --run workflow/crisplitdemo.yaml --params '{...}'`.
GUIDE_STYLE_WORKFLOW = """\
apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata:
  generateName: crisplitdemo-
spec:
  entrypoint: train
  arguments:
    parameters:
      - name: batch_size
        value: "8"
      - name: debug
        value: "false"
  templates:
    - name: train
      container:
        image: registry.example.com/kiln/model-training-gpu:0.1.0
        command: [python, src/train_model.py]
        args: ["train_bs={{workflow.parameters.batch_size}}"]
        resources:
          requests: {ephemeral-storage: 40Gi, nvidia.com/gpu: "1"}
          limits: {ephemeral-storage: 40Gi, nvidia.com/gpu: "1"}
      retryStrategy: {limit: "3", retryPolicy: Always}
"""


@pytest.fixture
def argo_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ArgoServerStandIn)
    server.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_argo_run_file_submits_the_given_workflow_with_its_params_set(tmp_path, argo_server):
    path = tmp_path / "crisplitdemo.yaml"
    path.write_text(GUIDE_STYLE_WORKFLOW)
    url = f"http://127.0.0.1:{argo_server.server_address[1]}"
    params = '{"batch_size": 2, "debug": "true"}'
    result = run_workflow_py("--server", url, "--run", str(path), "--params", params, env={"ARGO_TOKEN": "s3cr3t"})
    assert result.returncode == 0, result.stderr
    assert f"Submitted workflow kiln-pipeline-x7k2p ({path}): {url}/workflows/kiln/kiln-pipeline-x7k2p" in result.stdout
    [request] = argo_server.received
    assert request["path"] == "/api/v1/workflows/kiln"
    assert request["headers"]["Authorization"] == "Bearer s3cr3t"
    expected = yaml.safe_load(GUIDE_STYLE_WORKFLOW)
    expected["metadata"]["namespace"] = "kiln"
    expected["spec"]["arguments"]["parameters"] = [
        {"name": "batch_size", "value": "2"},
        {"name": "debug", "value": "true"},
    ]
    assert request["body"]["workflow"] == expected  # the file as written, nothing dropped, only the params set
    assert argo_schema_problems(request["body"]["workflow"]) == []


def test_argo_run_file_goes_to_the_files_namespace_unless_one_is_given(tmp_path, argo_server):
    manifest = yaml.safe_load(GUIDE_STYLE_WORKFLOW)
    manifest["metadata"]["namespace"] = "team-a"
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(manifest))
    url = f"http://127.0.0.1:{argo_server.server_address[1]}"
    assert run_workflow_py("--server", url, "--run", str(path)).returncode == 0
    assert run_workflow_py("--server", url, "--run", str(path), "--namespace", "team-b").returncode == 0
    paths = [request["path"] for request in argo_server.received]
    assert paths == ["/api/v1/workflows/team-a", "/api/v1/workflows/team-b"]
    assert [request["body"]["workflow"]["metadata"]["namespace"] for request in argo_server.received] == [
        "team-a",
        "team-b",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file; --run FILE takes the path of a Workflow YAML file"),
        ("spec: [\n", "is not valid YAML"),
        (GUIDE_STYLE_WORKFLOW + "---\n" + GUIDE_STYLE_WORKFLOW, "must hold one Workflow (a YAML mapping), found 2"),
        (
            GUIDE_STYLE_WORKFLOW.replace("kind: Workflow", "kind: CronWorkflow"),
            "kind 'CronWorkflow'; --run submits a Workflow (apiVersion: argoproj.io/v1alpha1, kind: Workflow)",
        ),
        (
            GUIDE_STYLE_WORKFLOW.replace("retryPolicy", "retryPolcy"),
            "Argo Workflows has no field(s) ['spec.templates[0].retryStrategy.retryPolcy']",
        ),
        (GUIDE_STYLE_WORKFLOW.replace('limit: "3"', "limit: [3]"), "is not a valid Argo Workflow"),
    ],
    ids=["missing", "not-yaml", "two-documents", "not-a-workflow", "unknown-field", "wrong-type"],
)
def test_argo_run_file_checks_the_file_before_submitting(tmp_path, argo_server, content, message):
    path = tmp_path / "wf.yaml"
    if content is not None:
        path.write_text(content)
    url = f"http://127.0.0.1:{argo_server.server_address[1]}"
    result = run_workflow_py("--server", url, "--run", str(path))
    assert result.returncode == 2
    assert f"error: {path}" in result.stderr and message in result.stderr
    assert argo_server.received == []


def test_argo_run_file_rejects_params_and_options_the_file_does_not_take(tmp_path, argo_server):
    path = tmp_path / "wf.yaml"
    path.write_text(GUIDE_STYLE_WORKFLOW)
    url = f"http://127.0.0.1:{argo_server.server_address[1]}"
    result = run_workflow_py("--server", url, "--run", str(path), "--params", '{"epochs": 3}')
    assert result.returncode == 2
    assert "declares no parameter(s) ['epochs']; it declares: ['batch_size', 'debug']" in result.stderr
    result = run_workflow_py("--server", url, "--run", str(path), "--gpus", "2")
    assert result.returncode == 2 and "--gpus only shape(s) kiln's pipeline" in result.stderr
    assert argo_server.received == []


def test_argo_run_reports_an_unreachable_server():
    result = run_workflow_py("--server", "http://127.0.0.1:9", "--run")
    assert result.returncode == 1
    assert "Submitting to http://127.0.0.1:9 (namespace kiln) failed" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Kubernetes manifests


def k8s_documents() -> list[tuple[str, dict]]:
    return [
        (str(path.relative_to(REPO)), document)
        for path in sorted(K8S.rglob("*.yml"))
        for document in load_yaml_documents(path)
    ]


def k8s_resource(kind: str, name: str) -> dict:
    return next(doc for _, doc in k8s_documents() if doc["kind"] == kind and doc["metadata"]["name"] == name)


def container_env(container: dict) -> dict[str, dict]:
    return {env["name"]: env for env in container.get("env", [])}


@pytest.mark.parametrize(
    ("path", "document"), k8s_documents(), ids=lambda value: value if isinstance(value, str) else ""
)
def test_k8s_manifest_validates_against_kubernetes(path, document):
    assert kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


def test_kubernetes_validate_checks_schemas_offline_and_strictly():
    job = copy.deepcopy(k8s_resource("Job", "kiln-train-model"))
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


def test_every_reference_between_the_k8s_manifests_resolves():
    documents = [doc for _, doc in k8s_documents()]
    secrets = {doc["metadata"]["name"]: doc["stringData"] for doc in documents if doc["kind"] == "Secret"}
    config_maps = {doc["metadata"]["name"] for doc in documents if doc["kind"] == "ConfigMap"}
    claims = {doc["metadata"]["name"] for doc in documents if doc["kind"] == "PersistentVolumeClaim"}
    workloads = [doc for doc in documents if doc["kind"] in ("Job", "Deployment", "StatefulSet")]
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        claim_templates = {claim["metadata"]["name"] for claim in workload["spec"].get("volumeClaimTemplates", [])}
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
        mounts_needed = {volume["name"] for volume in pod.get("volumes", [])} | claim_templates
        for container in pod["containers"] + pod.get("initContainers", []):
            assert {mount["name"] for mount in container.get("volumeMounts", [])} <= mounts_needed
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["key"] in secrets[ref["name"]], (workload["metadata"]["name"], ref)
    for service in (doc for doc in documents if doc["kind"] == "Service"):
        [target] = [
            w
            for w in workloads
            if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        port_names = {
            port["name"] for c in target["spec"]["template"]["spec"]["containers"] for port in c.get("ports", [])
        }
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names


def test_training_job_trains_on_a_gpu_on_the_shared_volume():
    job = k8s_resource("Job", "kiln-train-model")
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/kiln/model-training-gpu:0.1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    config = hydra_config([*container["command"], *container["args"]])
    assert (config.data_dir_path, config.no_cuda) == ("/kiln-data/data/processed", False)
    assert config.mlflow_tracking_uri == "http://mlflow-server-svc:5000"
    assert config.artifact_dir_path == "/kiln-data/models"


def test_sweep_workers_share_one_postgres_study():
    job = k8s_resource("Job", "kiln-optuna-sweep")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] > 1
    pod = spec["template"]["spec"]
    [worker] = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = container_env(worker)
    assert env["OPTUNA_STORAGE"]["valueFrom"]["secretKeyRef"] == {"name": "kiln-postgres", "key": "optuna-storage-url"}
    storage = k8s_resource("Secret", "kiln-postgres")["stringData"]["optuna-storage-url"]
    assert storage.startswith("postgresql://") and "@kiln-postgres:5432/optuna" in storage
    assert k8s_resource("Service", "kiln-postgres")["spec"]["ports"][0]["port"] == 5432
    values = {
        "OPTUNA_STORAGE": storage,
        "STUDY_NAME": env["STUDY_NAME"]["value"],
        "MLFLOW_HPTUNING_TAG": "kiln-optuna-sweep",
    }
    configs = []
    for index in ("0", "1"):
        words = [k8s_expand(word, {**values, "WORKER_INDEX": index}) for word in worker["command"] + worker["args"]]
        assert "--multirun" in words
        configs.append(hydra_config(words))
    assert {config.hydra.sweeper.storage for config in configs} == {storage}
    assert {config.hydra.sweeper.study_name for config in configs} == {"base-template"}
    assert configs[0].hydra.sweep.dir != configs[1].hydra.sweep.dir
    [init] = pod["initContainers"]
    assert "optuna create-study --skip-if-exists" in init["args"][0]
    assert init["env"] == worker["env"]
    # The `optuna` database the workers share is created with PostgreSQL's data directory.
    init_sql = k8s_resource("ConfigMap", "kiln-postgres-init")["data"]["create-optuna-database.sql"]
    assert "CREATE DATABASE optuna;" in init_sql


def test_sweep_init_container_lets_worker_0_alone_create_the_study(tmp_path):
    [init] = k8s_resource("Job", "kiln-optuna-sweep")["spec"]["template"]["spec"]["initContainers"]
    assert init["command"] == ["/bin/sh", "-c"]
    database = tmp_path / "optuna.db"
    env = {**os.environ, "OPTUNA_STORAGE": f"sqlite:///{database}", "STUDY_NAME": "base-template"}

    def start(index: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["/bin/sh", "-c", init["args"][0]],
            env={**env, "WORKER_INDEX": index},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    # Popen's context closes each worker's output pipe; killing an exited worker is a no-op.
    with start("1") as waiting:
        try:
            time.sleep(3)
            assert waiting.poll() is None, waiting.stdout.read()
            # It only reads: the schema is left to worker 0.
            with sqlite3.connect(database) as connection:
                assert connection.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall() == []
            with start("0") as creator:
                assert creator.wait(timeout=60) == 0, creator.stdout.read()
            assert waiting.wait(timeout=30) == 0, waiting.stdout.read()
        finally:
            waiting.kill()
    import optuna

    study = optuna.load_study(study_name="base-template", storage=env["OPTUNA_STORAGE"])
    assert [direction.name for direction in study.directions] == ["MINIMIZE", "MAXIMIZE"]


def test_fastapi_deployment_probes_the_servers_health_routes():
    deployment = k8s_resource("Deployment", "fastapi-server")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/kiln/fastapi-server:0.1.0"
    assert container["ports"] == [{"name": "http", "containerPort": 8080}]
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"] == {"path": "/v2/health/live", "port": "http"}
    assert probes["readinessProbe"] == {"path": "/v2/health/ready", "port": "http"}
    assert probes["startupProbe"]["path"] == "/v2/health/live"
    env = container_env(container)
    assert {"PRED_MODEL_UUID", "MLFLOW_TRACKING_URI"} <= env.keys()
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow-server-svc:5000"
    from kiln_fastapi.main import APP

    routes = APP.openapi()["paths"]
    assert {"/v2/health/live", "/v2/health/ready"} <= routes.keys()
    service = k8s_resource("Service", "fastapi-server-svc")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http"}]
    assert (K8S / "model-serving-api" / "fastapi-server-deployment.yml").exists()
    assert (K8S / "model-serving-api" / "fastapi-server-service.yml").exists()


def test_mlflow_server_tracks_to_postgres_and_stores_artifacts_in_s3():
    from mlflow.server.security_utils import is_allowed_host_header

    deployment = k8s_resource("Deployment", "mlflow-server")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow", "server"]
    args = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"] if "=" in arg)
    env = container_env(container)
    assert args["backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    ref = env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    backend = k8s_resource("Secret", ref["name"])["stringData"][ref["key"]]
    assert backend.startswith("postgresql://") and "@kiln-postgres:5432/mlflow" in backend
    statefulset = k8s_resource("StatefulSet", "kiln-postgres")
    assert container_env(statefulset["spec"]["template"]["spec"]["containers"][0])["POSTGRES_DB"]["value"] == "mlflow"
    assert args["artifacts-destination"].startswith("s3://") and "--serve-artifacts" in container["args"]
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"].startswith("https://")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env.keys()
    assert args["port"] == "5000"
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # MLflow 3 refuses requests whose Host it was not told about: the names clients use must pass.
    allowed = args["allowed-hosts"].split(",")
    for host in ("mlflow-server-svc:5000", "mlflow-server-svc.kiln.svc.cluster.local:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example.com")
    service = k8s_resource("Service", "mlflow-server-svc")
    assert service["spec"]["ports"][0]["port"] == 5000


# ---------------------------------------------------------------------------------------------------------
# MLflow Projects


def load_mlproject(directory: Path):
    from mlflow.projects._project_spec import load_project

    return load_project(str(directory))


def test_mlprojects_offer_the_same_entry_points_locally_and_on_kubernetes():
    local, kubernetes = load_mlproject(REPO), load_mlproject(MLFLOW_K8S)
    names = ["batch_inference", "process_data", "sweep", "train"]
    assert sorted(local._entry_points) == sorted(kubernetes._entry_points) == names
    assert local.docker_env is None
    assert kubernetes.docker_env == {"image": "registry.example.com/kiln/model-training-gpu:0.1.0"}
    for name in ("process_data", "train", "sweep"):
        local_params = set(local.get_entry_point(name).parameters)
        # On Kubernetes the tracking server and experiment are parameters (no shell to read them from).
        k8s_params = set(kubernetes.get_entry_point(name).parameters) - {"mlflow_tracking_uri", "mlflow_exp_name"}
        assert local_params >= k8s_params, name
    assert {"epochs", "lr", "train_bs", "data_dir_path", "train_limit", "test_limit"} <= set(
        local.get_entry_point("train").parameters
    )


def test_mlflow_kubernetes_backend_submits_valid_jobs_running_kiln_commands(monkeypatch):
    from mlflow.projects import _parse_kubernetes_config
    from mlflow.projects.kubernetes import _get_kubernetes_job_definition, _get_run_command
    from mlflow.projects.utils import get_entry_point_command

    backend_config = json.loads((MLFLOW_K8S / "kubernetes_config.json").read_text())
    assert (REPO / backend_config["kube-job-template-path"]).is_file()
    monkeypatch.chdir(REPO)  # `mlflow run` is started from the repo root, which the template path is relative to
    kube_config = _parse_kubernetes_config(backend_config)
    project = load_mlproject(MLFLOW_K8S)
    runs = {
        "process_data": {},
        "train": {"epochs": "3", "lr": "0.9"},
        "sweep": {"n_trials": "6"},
        "batch_inference": {"model_path": "runs:/0a1b/model", "input_data_dir": "/kiln-data/new"},
    }
    for entry_point, params in runs.items():
        command = _get_run_command(get_entry_point_command(project, entry_point, params, None))
        # MLflow gives Kubernetes the command word by word, shell-quoted: a quoted word would reach Hydra
        # with its quotes.
        assert not [word for word in command if word.startswith(("'", '"'))], command
        env = {
            "MLFLOW_RUN_ID": "0a1b",
            "MLFLOW_TRACKING_URI": "http://mlflow-server-svc:5000",
            "MLFLOW_EXPERIMENT_ID": "1",
        }
        job = _get_kubernetes_job_definition(
            project.name,
            "registry.example.com/kiln/model-training-gpu:0.1.0",
            "sha256:" + "0" * 64,
            command,
            env,
            copy.deepcopy(kube_config["kube-job-template"]),
        )
        assert kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION
        [container] = job["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["workingDir"] == "/home/aisg/kiln"
        config = hydra_config(command)
        if entry_point == "train":
            assert (config.epochs, config.lr, config.mlflow_tracking_uri) == (3, 0.9, "http://mlflow-server-svc:5000")
        if entry_point == "sweep":
            assert command[:3] == ["env", "-u", "MLFLOW_RUN_ID"]
            assert config.hydra.sweeper.n_trials == 6
        if entry_point == "batch_inference":
            assert config.inference.model_path == "runs:/0a1b/model"


def mlflow_run(project: Path, entry_point: str, params: dict[str, str], tracking: Path, *extra: str):
    command = [sys.executable, "-m", "mlflow", "run", str(project), "-e", entry_point, "--env-manager", "local", *extra]
    for name, value in params.items():
        command += ["-P", f"{name}={value}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def mlproject_copy(tmp_path: Path) -> Path:
    """The project as `mlflow run` sees it, outside the repo so its outputs land in tmp."""
    import shutil

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "MLproject", project)
    for folder in ("src", "conf"):
        shutil.copytree(REPO / folder, project / folder)
    return project


def test_mlflow_run_train_logs_into_the_project_run(mlproject_copy, processed_sample, tmp_path, monkeypatch):
    import mlflow

    tracking = tmp_path / "mlruns"
    params = {"epochs": "1", "data_dir_path": str(processed_sample), "train_limit": "200", "test_limit": "100"}
    result = mlflow_run(mlproject_copy, "train", params, tracking)
    assert result.returncode == 0, result.stdout + result.stderr
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=tracking.as_uri())
    [run] = client.search_runs(experiment_ids=["0"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "train"
    assert run.info.run_name.startswith("train-model-")
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    assert run.data.params["epochs"] == "1"
    assert [metric.step for metric in client.get_metric_history(run.info.run_id, "test_accuracy")] == [1]


def test_mlflow_run_sweep_logs_each_trial_as_its_own_run(mlproject_copy, processed_sample, tmp_path, monkeypatch):
    import mlflow

    tracking = tmp_path / "mlruns"
    params = {
        "n_trials": "2",
        "epochs": "1",
        "data_dir_path": str(processed_sample),
        "train_limit": "200",
        "test_limit": "100",
    }
    result = mlflow_run(mlproject_copy, "sweep", params, tracking, "--experiment-name", "kiln-sweep")
    assert result.returncode == 0, result.stdout + result.stderr
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=tracking.as_uri())
    experiment = client.get_experiment_by_name("kiln-sweep")
    runs = client.search_runs(experiment_ids=[experiment.experiment_id])
    [project_run] = [run for run in runs if run.data.tags.get("mlflow.project.entryPoint") == "sweep"]
    trials = [run for run in runs if run is not project_run]
    assert len(trials) == 2 and project_run.info.status == "FINISHED"
    for trial in trials:
        assert trial.info.status == "FINISHED" and trial.info.run_name.startswith("train-model-hp-")
        assert trial.data.tags["hptuning_tag"] == project_run.info.run_id
        assert "test_accuracy" in trial.data.metrics
