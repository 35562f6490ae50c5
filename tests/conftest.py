"""Shared fixtures: the repo's paths, sample data subsets and a runner for the real Hydra apps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


class MlflowServer:
    """A real `mlflow server` process on a free loopback port."""

    def __init__(self, root: Path, *backend_args: str, env: dict[str, str] | None = None) -> None:
        import time
        import urllib.request

        port = free_port()
        self.uri = f"http://127.0.0.1:{port}"
        self._log_path = root / f"mlflow-server-{port}.log"
        self._log = open(self._log_path, "w")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "mlflow", "server", *backend_args]
        command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        self._process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start:\n{self._log_path.read_text()}")
            time.sleep(0.5)

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
        self._log.close()


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
