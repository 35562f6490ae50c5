"""Data-parallel training under torchrun, 2 gloo processes on this machine: kiln's C++ trainer on
torch.distributed's process group (identical weights on every rank, the same model as one process
training the same global batches), `torchrun ... src/train_model.py` with one MLflow run, a worker
killed mid-epoch and restarted by torchrun, and a rank without its data stopping every rank.

Every torchrun gets a subprocess timeout and every process group a collective timeout
(dist_timeout_s), so a broken rank fails the test instead of hanging CI."""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

import kiln
from conftest import REPO, client_for, steps
from kiln.cli import compose_config

# What one torchrun may take at most here (2 cores, two processes, a few epochs of the sample).
TORCHRUN_TIMEOUT = 240


def torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    """The torchrun command line a user types (``--standalone``: rendezvous on a free local port);
    torchrun checks its workers every 0.5 s, so a failed one stops the others quickly."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "--monitor-interval=0.5",
        *extra,
        *args,
    ]


def run_torchrun(*args: str, cwd: Path, nproc: int = 2, extra: tuple[str, ...] = (), env: dict[str, str] | None = None):
    return subprocess.run(
        torchrun(*args, nproc=nproc, extra=extra),
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=TORCHRUN_TIMEOUT,
    )


# Trains one epoch with kiln.Trainer on the torchrun group and saves this rank's weights and metrics.
WORKER = textwrap.dedent(
    """
    import sys
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import kiln

    data, out, model, precision, batch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    trainer = kiln.Trainer(data, model=model, precision=precision, train_batch_size=batch, seed=7,
                           train_limit=512, test_limit=200, process_group=dist.group.WORLD.group_name)
    metrics = trainer.run_epoch()
    trainer.save_checkpoint(f"{out}/rank{dist.get_rank()}.pt")
    torch.save({"metrics": metrics, "world_size": trainer.world_size, "rank": trainer.rank},
               f"{out}/rank{dist.get_rank()}.metrics.pt")
    dist.destroy_process_group()
    """
)

EPOCH_METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]["state_dict"]


@pytest.mark.parametrize(("model", "precision"), [("mnist_cnn", "fp32"), ("resnet8", "bf16")])
def test_two_ranks_hold_bitwise_identical_weights_and_report_the_same_metrics(
    tmp_path: Path, processed_sample: Path, model: str, precision: str
) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    result = run_torchrun(str(worker), str(processed_sample), str(tmp_path), model, precision, "32", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = state(tmp_path / "rank0.pt"), state(tmp_path / "rank1.pt")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name  # buffers (batch-norm statistics) included
    reports = [torch.load(tmp_path / f"rank{r}.metrics.pt", weights_only=False) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1] and {r["world_size"] for r in reports} == {2}
    for key in (*EPOCH_METRICS, "epoch", "learning_rate"):
        assert reports[0]["metrics"][key] == reports[1]["metrics"][key], key


# Trains one epoch resident and one streamed from the shards (data_memory_budget=1) on the torchrun group.
STREAMED_WORKER = textwrap.dedent(
    """
    import sys
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import kiln

    data, out, model, freeze = sys.argv[1:5]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    metrics = {}
    for name, budget in (("resident", 0), ("streamed", 1)):
        trainer = kiln.Trainer(data, model=model, freeze=freeze, train_batch_size=32, seed=7, train_limit=512,
                               test_limit=200, data_memory_budget=budget, num_workers=1,
                               process_group=dist.group.WORLD.group_name)
        assert trainer.streams_data == (budget == 1)
        metrics[name] = trainer.run_epoch()
        trainer.save_checkpoint(f"{out}/rank{dist.get_rank()}.{name}.pt")
    torch.save(metrics, f"{out}/rank{dist.get_rank()}.streamed.pt")
    dist.destroy_process_group()
    """
)


@pytest.mark.parametrize(("model", "freeze"), [("mnist_cnn", "none"), ("resnet8", "backbone")])
def test_two_ranks_streaming_from_the_shards_train_as_two_resident_ranks(
    tmp_path: Path, processed_sample: Path, model: str, freeze: str
) -> None:
    """Each rank's loader reads only its share of every global batch (DistributedSampler's rule on the
    same permutation), so streamed and resident data-parallel epochs give the same metrics. With a frozen
    backbone only the head trains, on both ranks alike."""
    worker = tmp_path / "worker.py"
    worker.write_text(STREAMED_WORKER)
    result = run_torchrun(str(worker), str(processed_sample), str(tmp_path), model, freeze, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in (0, 1):
        metrics = torch.load(tmp_path / f"rank{rank}.streamed.pt", weights_only=False)
        for key in EPOCH_METRICS:
            assert metrics["streamed"][key] == metrics["resident"][key], (rank, key)
    first, second = state(tmp_path / "rank0.resident.pt"), state(tmp_path / "rank1.resident.pt")
    for name in first:
        assert torch.equal(first[name], second[name]), name
    if freeze == "backbone":
        untrained = kiln.Trainer(processed_sample, model=model, seed=7, train_limit=512, test_limit=200)
        untrained.save_checkpoint(tmp_path / "untrained.pt")
        initial = state(tmp_path / "untrained.pt")
        changed = {n for n, t in first.items() if t.is_floating_point() and not torch.equal(t, initial[n])}
        assert changed and all(n.startswith("fc.") or "running_" in n for n in changed), changed


def test_two_ranks_train_the_model_one_process_trains_on_the_same_global_batches(
    tmp_path: Path, processed_sample: Path, request: pytest.FixtureRequest
) -> None:
    """2 ranks x 32 images per batch = one process with batches of 64: the same images in each
    global batch (DistributedSampler's rule) and the same dropout masks (kiln's dropout stream is
    laid out by global batch row), dropout on. Only float32 summation order differs (two sums of 32
    averaged instead of one of 64): after an epoch the weights are usually within ~1e-7, but a
    rounding difference can flip a max-pool choice and the next updates carry it (seen up to 4e-4 on
    weights of magnitude ~0.3). Tolerance: 2e-3 on every weight, 1e-3 relative on the metrics;
    training with another global batch moves the weights by ~0.6."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    # One thread per process on both sides: with one thread mnist_cnn's conv2 takes kiln's Winograd form,
    # with more oneDNN's direct convolution (other roundings), so both sides compute with the same kernels.
    one_thread = {"OMP_NUM_THREADS": "1"}
    args = (str(worker), str(processed_sample), str(tmp_path), "mnist_cnn", "fp32", "32")
    result = run_torchrun(*args, cwd=tmp_path, env=one_thread)
    assert result.returncode == 0, result.stdout + result.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    single = kiln.Trainer(
        processed_sample,
        model="mnist_cnn",
        precision="fp32",
        train_batch_size=64,
        seed=7,
        train_limit=512,
        test_limit=200,
    )
    expected = single.run_epoch()
    single.save_checkpoint(tmp_path / "single.pt")
    distributed, alone = state(tmp_path / "rank0.pt"), state(tmp_path / "single.pt")
    for name in alone:
        torch.testing.assert_close(distributed[name], alone[name], rtol=0, atol=2e-3, msg=name)
    reported = torch.load(tmp_path / "rank0.metrics.pt", weights_only=False)["metrics"]
    for key in EPOCH_METRICS:
        assert reported[key] == pytest.approx(expected[key], rel=1e-3), key
    # A different global batch trains a different model: the comparison can fail.
    other = kiln.Trainer(
        processed_sample,
        model="mnist_cnn",
        precision="fp32",
        train_batch_size=32,
        seed=7,
        train_limit=512,
        test_limit=200,
    )
    other.run_epoch()
    other.save_checkpoint(tmp_path / "other.pt")
    assert (state(tmp_path / "other.pt")["fc2.weight"] - distributed["fc2.weight"]).abs().max() > 0.05


def runs_of(client, experiment: str):
    record = client.get_experiment_by_name(experiment)
    return client.search_runs([record.experiment_id]) if record else []


def train_model_args(processed: Path, tmp_path: Path, uri: str, experiment: str, *overrides: str) -> list[str]:
    return [
        str(REPO / "src" / "train_model.py"),
        f"data_dir_path={processed}",
        f"artifact_dir_path={tmp_path / 'models'}",
        f"log_dir={tmp_path / 'logs'}",
        f"mlflow_tracking_uri={uri}",
        f"mlflow_exp_name={experiment}",
        "dist_timeout_s=60",
        f"hydra.run.dir={tmp_path / 'outputs'}",
        *overrides,
    ]


def test_torchrun_train_model_logs_one_run_from_rank_0(
    tmp_path: Path, processed_sample: Path, mlflow_server: str
) -> None:
    experiment = "torchrun-two-ranks"
    logs = tmp_path / "torchrun-logs"
    result = run_torchrun(
        *train_model_args(
            processed_sample, tmp_path, mlflow_server, experiment, "epochs=2", "train_limit=512", "test_limit=200"
        ),
        cwd=tmp_path,
        extra=(f"--log-dir={logs}", "--redirects=3"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    client = client_for(mlflow_server)
    runs = runs_of(client, experiment)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"
    assert run.data.params["train_batch_size"] == "32"  # per rank
    for key in EPOCH_METRICS:
        assert steps(client, run.info.run_id, key) == [1, 2], key
    assert (tmp_path / "models" / run.info.run_id / "checkpoint.pt").is_file()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "checkpoint"} <= artifacts
    # Rank 0 tells the job's story; rank 1 logs warnings only.
    rank_logs = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    assert "Epoch 2: train loss" in rank_logs[0]
    assert "world_size" not in rank_logs[1] and " - INFO - " not in rank_logs[1], rank_logs[1]


def test_a_sweep_under_torchrun_trains_every_trial_on_every_rank(
    tmp_path: Path, processed_sample: Path, mlflow_server: str
) -> None:
    """The in-memory study is seeded and every rank sees the same (all-reduced) objectives, so the ranks
    propose the same trials and train each together; rank 0 logs one run per trial."""
    experiment = "torchrun-sweep"
    args = train_model_args(
        processed_sample, tmp_path, mlflow_server, experiment, "epochs=1", "train_limit=256", "test_limit=100"
    )
    args = [a for a in args if not a.startswith("hydra.run.dir")]
    result = run_torchrun(
        *args[:1],
        "--multirun",
        *args[1:],
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    runs = runs_of(client_for(mlflow_server), experiment)
    assert len(runs) == 2, [r.info.run_name for r in runs]
    assert {r.data.params["world_size"] for r in runs} == {"2"}
    assert all(r.info.status == "FINISHED" and "-hp-" in r.info.run_name for r in runs)
    trials = {(r.data.params["learning_rate"], r.data.params["train_batch_size"]) for r in runs}
    assert len(trials) == 2  # two different trials, each trained once by both ranks together


def worker_of_rank(torchrun_process: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(torchrun_process.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "train_model.py" in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_a_worker_killed_mid_epoch_is_restarted_and_the_run_goes_on(
    tmp_path: Path, processed_sample: Path, mlflow_server: str
) -> None:
    experiment = "torchrun-restarted"
    log = open(tmp_path / "torchrun.log", "w")  # noqa: SIM115 - a file, not a pipe that could fill and block the job
    job = subprocess.Popen(
        torchrun(
            *train_model_args(processed_sample, tmp_path, mlflow_server, experiment, "epochs=3", "test_limit=200"),
            extra=("--max-restarts=1",),
        ),
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        client = client_for(mlflow_server)
        deadline = time.monotonic() + TORCHRUN_TIMEOUT
        run_id = None
        while time.monotonic() < deadline and job.poll() is None:
            runs = runs_of(client, experiment)
            if runs:
                run_id = runs[0].info.run_id
                if steps(client, run_id, "test_accuracy"):
                    break
            time.sleep(0.2)
        assert run_id is not None and job.poll() is None, "the job did not log an epoch in time"
        time.sleep(0.3)  # into epoch 2
        victim = worker_of_rank(job, 1)
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        job.wait(timeout=TORCHRUN_TIMEOUT)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        log.close()
    output = (tmp_path / "torchrun.log").read_text()
    assert job.returncode == 0, output
    assert "Restarted by torchrun (restart 1)" in output
    runs = runs_of(client, experiment)
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert steps(client, run_id, key) == [1, 2, 3], key  # each epoch once: no gap, no duplicate
    checkpoint = torch.load(tmp_path / "models" / run_id / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 3


def test_a_rank_without_its_data_stops_every_rank_with_a_clear_error(tmp_path: Path, processed_sample: Path) -> None:
    """Each rank reads data_dir_path on its own machine: here rank 0's exists and rank 1's does not."""
    data = tmp_path / "node-data"
    data.mkdir()
    (data / "rank0").symlink_to(processed_sample, target_is_directory=True)
    logs = tmp_path / "torchrun-logs"
    started = time.monotonic()
    result = run_torchrun(
        str(REPO / "src" / "train_model.py"),
        f"data_dir_path={data}/rank${{oc.env:RANK}}",
        "setup_mlflow=false",
        "dist_timeout_s=60",
        f"artifact_dir_path={tmp_path / 'models'}",
        f"log_dir={tmp_path / 'logs'}",
        f"hydra.run.dir={tmp_path / 'outputs'}",
        cwd=tmp_path,
        extra=(f"--log-dir={logs}", "--redirects=3"),
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 60, "the failure took as long as a timeout"
    rank_logs = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    for rank in (0, 1):  # every rank says which rank failed and why, in one line, without a traceback
        assert f"rank 1 on {os.uname().nodename}" in rank_logs[rank], rank_logs[rank]
        assert f"{data}/rank1" in rank_logs[rank] and "does not exist" in rank_logs[rank]
        assert "Traceback" not in rank_logs[rank]
    assert not (tmp_path / "models").exists()


# ---------------------------------------------------------------------------------------------------------
# Deploy files: what they run is torchrun's own command line and a config kiln's Hydra app accepts.


def torchrun_parts(words: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """torchrun's options as torchrun itself parses them, and the train_model.py overrides after the script."""
    from torch.distributed.run import get_args_parser

    start = words.index("torchrun") + 1 if "torchrun" in words else 0
    options = get_args_parser().parse_args(words[start:])
    assert Path(options.training_script).name == "train_model.py"
    return options, options.training_script_args


def test_multinode_manifest_runs_torchrun_with_c10d_rendezvous_at_pod_0() -> None:
    import kubernetes_validate
    import yaml

    path = REPO / "deploy" / "k8s" / "model-training" / "train-model-multinode.yml"
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    service = next(d for d in documents if d["kind"] == "Service")
    job = next(d for d in documents if d["kind"] == "Job")
    for document in documents:  # Kubernetes' own schema, offline and strict (unknown fields fail)
        kubernetes_validate.validate(document, "1.30", strict=True)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    spec = job["spec"]
    pod = spec["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    [container] = pod["containers"]
    options, overrides = torchrun_parts([*container["command"], *container["args"]])
    assert int(options.nnodes) == spec["completions"] == spec["parallelism"] == 2
    assert options.nproc_per_node == container["resources"]["limits"]["nvidia.com/gpu"]
    assert options.rdzv_backend == "c10d" and options.max_restarts >= 1
    host, port = options.rdzv_endpoint.split(":")
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"  # pod 0's DNS name
    assert int(port) == service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"]
    config = compose_config("train_model", overrides)
    assert (config.no_cuda, config.dist_backend, config.artifact_dir_path) == (False, "auto", "/kiln-data/models")
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/kiln-data", "/dev/shm"}


def test_argo_gpus_runs_training_under_torchrun_one_process_per_gpu() -> None:
    spec = importlib.util.spec_from_file_location("kiln_argo_workflow", REPO / "deploy" / "argo" / "workflow.py")
    argo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(argo)

    def train_step(gpus: int) -> dict:
        manifest = argo.build_workflow(gpus=gpus).to_dict()
        return next(t for t in manifest["spec"]["templates"] if t["name"] == "train-model")["container"]

    single = train_step(1)
    assert single["command"] == ["python", "src/train_model.py"]
    four = train_step(4)
    options, _ = torchrun_parts([*four["command"], *four["args"]])
    assert options.nproc_per_node == "4" and options.standalone
    assert four["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert {m["mountPath"] for m in four["volumeMounts"]} == {"/kiln-data", "/dev/shm"}


@pytest.mark.parametrize(("gpus", "launcher"), [("1", ["python"]), ("4", ["torchrun", "--standalone"])])
def test_runai_training_with_several_gpus_runs_torchrun(gpus: str, launcher: list[str]) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "deploy" / "runai" / "submit-training.sh"), "--dry-run", "epochs=2"],
        env={**os.environ, "MLFLOW_TRACKING_URI": "http://mlflow:5000", "KILN_GPU": gpus},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    command = result.stdout.split("source activate kiln && ", 1)[1].rstrip('"\n').split()
    assert command[: len(launcher)] == launcher
    assert f"--gpu {gpus}" in result.stdout
    if gpus != "1":
        options, overrides = torchrun_parts(command)
        assert options.nproc_per_node == gpus
        config = compose_config("train_model", [o.removeprefix("train_model.") for o in overrides])
        assert (config.no_cuda, config.epochs) == (False, 2)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dist_backend=nccl", "dist_backend=nccl reduces GPU tensors but training runs on cpu"),
        ("dist_backend=mpi", "dist_backend must be one of auto, gloo, nccl, got 'mpi'"),
    ],
)
def test_an_unusable_backend_is_refused_before_any_work(
    tmp_path: Path, processed_sample: Path, override: str, message: str
) -> None:
    logs = tmp_path / "torchrun-logs"
    result = run_torchrun(
        str(REPO / "src" / "train_model.py"),
        f"data_dir_path={processed_sample}",
        "setup_mlflow=false",
        override,
        f"artifact_dir_path={tmp_path / 'models'}",
        f"log_dir={tmp_path / 'logs'}",
        f"hydra.run.dir={tmp_path / 'outputs'}",
        cwd=tmp_path,
        extra=(f"--log-dir={logs}", "--redirects=3"),
    )
    assert result.returncode != 0
    rank_logs = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    # Each rank checks on its own, before any collective; torchrun may stop rank 1 before it says so.
    assert message in rank_logs[0] and "Traceback" not in rank_logs[0], rank_logs[0]
    assert not any("Training mnist_cnn" in log for log in rank_logs.values())
    assert not (tmp_path / "models").exists()
