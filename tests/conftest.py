"""Shared fixtures: the repo's paths, sample data subsets and a runner for the real Hydra apps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


def run_app(
    script: str,
    *overrides: str,
    cwd: Path,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    replace_env: bool = False,
) -> subprocess.CompletedProcess:
    """Run `python src/<script> <overrides>` as a user would, from `cwd`.

    `env` adds to this process's environment, or replaces it with `replace_env`.
    """
    env = dict(env or {}) if replace_env else {**os.environ, **(env or {})}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "src" / script),
            *overrides,
            f"hydra.run.dir={cwd / 'outputs'}",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def client_for(uri: str):
    """An MlflowClient of the tracking server or store at ``uri``."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def steps(client, run_id: str, key: str) -> list[int]:
    """The steps at which ``key`` was logged to the run, sorted."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def wait_for_logged_epoch(client, experiment: str, job: subprocess.Popen, timeout: float = 240) -> str:
    """Waits while ``job`` (a train_model.py process) runs until its run in ``experiment`` has logged an
    epoch's test_accuracy; returns the run's id. Fails if the job ends or the time runs out first."""
    deadline = time.monotonic() + timeout
    run_id = None
    while time.monotonic() < deadline and job.poll() is None:
        record = client.get_experiment_by_name(experiment)
        runs = client.search_runs([record.experiment_id]) if record else []
        if runs:
            run_id = runs[0].info.run_id
            if steps(client, run_id, "test_accuracy"):
                return run_id
        time.sleep(0.2)
    raise AssertionError(f"training did not log an epoch in time (run {run_id}, exit code {job.poll()})")


def copy_sample(destination: Path, per_class: int, classes: int = 10) -> Path:
    """Copy the first `per_class` images of the first `classes` classes of each sample split."""
    for split_dir in sorted(SAMPLE.iterdir()):
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir())[:classes]:
            target = destination / split_dir.name / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:per_class]:
                shutil.copyfile(image, target / image.name)
    return destination


@pytest.fixture
def small_raw(tmp_path: Path) -> Path:
    return copy_sample(tmp_path / "raw", per_class=5, classes=3)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def processed_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded sample, prepared once for the session."""
    import kiln

    processed = tmp_path_factory.mktemp("sample") / "processed"
    kiln.prepare_dataset(SAMPLE, processed)
    return processed


class ServerProcess:
    """A server started as a subprocess on a free loopback port; its output goes to <root>/<name>-<port>.log."""

    def __init__(
        self,
        root: Path,
        name: str,
        command: Callable[[int], list[str]],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = root / f"{name}-{port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command(port), cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def wait_healthy(self, path: str, timeout: float) -> None:
        """Return once GET <path> answers 200; raise with the server's log if it exits or times out."""
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}{path}", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {timeout}s:\n{self.log()}")
            time.sleep(0.3)

    def log(self) -> str:
        """The server's output so far; also after stop(). The server writes to the file itself."""
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


class MlflowServer(ServerProcess):
    """A real `mlflow server` process on a free loopback port, healthy once constructed."""

    def __init__(self, root: Path, *backend_args: str, env: dict[str, str] | None = None) -> None:
        def command(port: int) -> list[str]:
            return [sys.executable, "-m", "mlflow", "server", *backend_args] + [
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ]

        super().__init__(root, "mlflow-server", command, env=env)
        self.uri = self.url
        try:
            self.wait_healthy("/health", timeout=120)
        except RuntimeError:
            self.stop()
            raise


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` (SQLite backend, local artifacts) on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(
        root,
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    )
    yield server.uri
    server.stop()


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory, processed_sample: Path) -> Path:
    """A kiln checkpoint trained for one short epoch on the sample (not tracked)."""
    import kiln

    trainer = kiln.Trainer(processed_sample, train_limit=600, test_limit=200, seed=5)
    trainer.run_epoch()
    checkpoint = tmp_path_factory.mktemp("model") / "checkpoint.pt"
    trainer.save_checkpoint(checkpoint)
    return checkpoint


@dataclass(frozen=True)
class TrackedRun:
    run_id: str
    checkpoint: Path


def train_tracked(work: Path, mlflow_server: str, experiment: str, *overrides: str) -> TrackedRun:
    """The one run of the real train_model.py (with ``overrides``) in ``experiment`` of the MLflow server,
    run from ``work``, which holds its checkpoints and logs."""
    result = run_app(
        "train_model.py",
        *overrides,
        f"mlflow_tracking_uri={mlflow_server}",
        f"mlflow_exp_name={experiment}",
        f"artifact_dir_path={work / 'models'}",
        f"log_dir={work / 'logs'}",
        cwd=work,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    client = client_for(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return TrackedRun(run.info.run_id, work / "models" / run.info.run_id / "checkpoint.pt")


@pytest.fixture(scope="session")
def tracked_run(tmp_path_factory: pytest.TempPathFactory, processed_sample: Path, mlflow_server: str) -> str:
    """The id of a run trained by the real train_model.py and logged to the session's MLflow server."""
    work = tmp_path_factory.mktemp("tracked-run")
    overrides = (f"data_dir_path={processed_sample}", "epochs=1", "train_limit=600", "test_limit=200")
    return train_tracked(work, mlflow_server, "kiln-inference-tests", *overrides).run_id
