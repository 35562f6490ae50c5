"""Distributed sweeps: several `--multirun` processes (e.g. k8s Job pods) sharing one Optuna study in a
real PostgreSQL server, started here on loopback."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import REPO, free_port

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def as_postgres(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI runs as root, developers usually not.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres() -> Iterator[str]:
    if not PG_BIN:
        pytest.fail("PostgreSQL is not installed: scripts/setup.sh installs Debian's postgresql")
    bin_dir = Path(PG_BIN[-1])
    # Outside pytest's private tmp dir, which the postgres user may not enter.
    root = Path(tempfile.mkdtemp(prefix="kiln-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data = root / "data"
    subprocess.run(
        as_postgres([str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres"]),
        check=True,
        capture_output=True,
    )
    port = free_port()
    server = subprocess.Popen(
        as_postgres(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-k",
                str(root),
                "-c",
                "listen_addresses=127.0.0.1",
            ]
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while (
        subprocess.run(
            [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True
        ).returncode
        != 0
    ):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail("PostgreSQL did not start")
        time.sleep(0.3)
    subprocess.run(
        [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "optuna"], check=True
    )
    yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    server.terminate()
    server.wait(timeout=30)
    shutil.rmtree(root, ignore_errors=True)


def test_two_sweep_processes_share_one_postgres_study(tmp_path: Path, processed_sample: Path, postgres: str) -> None:
    common = [
        sys.executable, str(REPO / "src" / "train_model.py"), "--multirun",
        f"data_dir_path={processed_sample}", "setup_mlflow=false", "epochs=1", "train_limit=200", "test_limit=100",
        f"hydra.sweeper.storage={postgres}", "hydra.sweeper.study_name=distributed", "hydra.sweeper.n_trials=2",
    ]  # fmt: skip
    # The study (and Optuna's schema) is created once before the workers start, as a k8s init step would:
    # two processes creating a fresh schema at the same moment collide in PostgreSQL (duplicate ENUM type).
    subprocess.run(
        [str(Path(sys.executable).with_name("optuna")), "create-study", "--storage", postgres,
         "--study-name", "distributed", "--directions", "minimize", "maximize", "--skip-if-exists"],
        check=True, capture_output=True,
    )  # fmt: skip
    workers = [
        subprocess.Popen(
            [*common, f"artifact_dir_path={tmp_path / f'models-{i}'}", f"hydra.sweep.dir={tmp_path / f'worker-{i}'}"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    storage = optuna.storages.RDBStorage(postgres)
    try:
        study = optuna.load_study(study_name="distributed", storage=storage)
        trials = study.trials
        # The worker that finished last wrote the Pareto front of the whole study, all workers' trials included.
        study_front = sorted(tuple(t.values) for t in study.best_trials)
    finally:
        storage.engine.dispose()  # closes the pooled connections now, not at garbage collection
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # every worker's trials, none duplicated
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    fronts = [
        sorted(tuple(solution["values"]) for solution in yaml.safe_load(path.read_text())["solutions"])
        for path in tmp_path.glob("worker-*/optimization_results.yaml")
    ]
    assert study_front in fronts
