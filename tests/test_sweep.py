"""`python src/train_model.py --multirun`: the seed's Optuna block on the sample, tracked in MLflow."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import yaml

from conftest import run_app

QUICK = ("epochs=1", "train_limit=200", "test_limit=100")


def sweep(
    processed: Path,
    tmp_path: Path,
    uri: str,
    experiment: str,
    *overrides: str,
    name: str = "multirun",
    env: dict[str, str] | None = None,
):
    return run_app(
        "train_model.py",
        "--multirun",
        f"data_dir_path={processed}",
        f"artifact_dir_path={tmp_path / 'models'}",
        f"mlflow_tracking_uri={uri}",
        f"mlflow_exp_name={experiment}",
        f"hydra.sweep.dir={tmp_path / name}",
        *QUICK,
        *overrides,
        cwd=tmp_path,
        timeout=600,
        env=env,
    )


def assert_grouped_by_the_sweeps_start(runs, sweep_dir: Path, started: int, ended: int) -> None:
    """One hptuning_tag for the sweep's runs: the epoch seconds of the sweep's start, as the template's
    guides describe it, recorded in the sweep's dir; the dir itself is tag hptuning_dir."""
    (tag,) = {run.data.tags["hptuning_tag"] for run in runs}
    assert tag.isdigit() and started <= int(tag) <= ended, (tag, started, ended)
    assert int(tag) <= min(run.info.start_time for run in runs) // 1000  # fixed before any trial started
    assert (sweep_dir / "hptuning_tag").read_text().strip() == tag
    assert {run.data.tags["hptuning_dir"] for run in runs} == {str(sweep_dir)}


def test_seed_sweep_gives_three_grouped_runs_and_a_pareto_front(
    tmp_path: Path, processed_sample: Path, mlflow_server: str
) -> None:
    import mlflow

    started = int(time.time())
    result = sweep(processed_sample, tmp_path, mlflow_server, "sweep")
    assert result.returncode == 0, result.stdout + result.stderr
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert len(runs) == 3
    assert all(run.info.run_name.startswith("train-model-hp-") for run in runs)
    assert_grouped_by_the_sweeps_start(runs, tmp_path / "multirun", started, int(time.time()))
    assert sorted(run.data.tags["trial_number"] for run in runs) == ["0", "1", "2"]
    assert {run.data.tags["study_name"] for run in runs} == {"base-template"}
    for run in runs:
        assert 0.9 <= float(run.data.params["learning_rate"]) <= 1.7
        assert run.data.params["train_batch_size"] in {"32", "48", "64"}
    front = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    assert front["name"] == "optuna" and front["solutions"]
    for solution in front["solutions"]:
        assert len(solution["values"]) == 2  # (test_loss, test_accuracy)


def test_failing_trials_are_recorded_and_the_sweep_goes_on(
    tmp_path: Path, processed_sample: Path, mlflow_server: str
) -> None:
    import mlflow

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = sweep(
        processed_sample,
        tmp_path,
        mlflow_server,
        "sweep-failures",
        "lr=choice(1.0,1e30)",  # with the seed's sampler seed 55, trials 0-2 get 1.0, 1e30, 1e30
        "train_bs=choice(32)",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=failures",
        env={"MLFLOW_HPTUNING_TAG": "1641159546"},  # the guides' `-P MLFLOW_HPTUNING_TAG="$(date +%s)"`
    )
    assert result.returncode == 0, result.stdout + result.stderr
    trials = optuna.load_study(study_name="failures", storage=storage).trials
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 3 and failed and complete
    assert all(t.params["lr"] == 1e30 for t in failed) and all(t.params["lr"] == 1.0 for t in complete)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("sweep-failures").experiment_id])
    assert sorted(run.info.status for run in runs) == sorted(["FAILED"] * len(failed) + ["FINISHED"] * len(complete))
    # The user's MLFLOW_HPTUNING_TAG wins over the sweep's start time.
    assert {run.data.tags["hptuning_tag"] for run in runs} == {"1641159546"}


def test_a_sqlite_study_continues_across_invocations(
    tmp_path: Path, processed_sample: Path, mlflow_server: str
) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for name in ("first", "second"):
        result = sweep(
            processed_sample,
            tmp_path,
            mlflow_server,
            "sweep-continued",
            "hydra.sweeper.n_trials=2",
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=continued",
            name=name,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    trials = optuna.load_study(study_name="continued", storage=storage).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def test_parallel_trials_in_separate_processes(tmp_path: Path, processed_sample: Path, mlflow_server: str) -> None:
    import mlflow

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    started = int(time.time())
    result = sweep(
        processed_sample,
        tmp_path,
        mlflow_server,
        "sweep-parallel",
        "hydra/launcher=joblib",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=parallel",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is launching 2 jobs" in result.stdout + result.stderr
    trials = optuna.load_study(study_name="parallel", storage=storage).trials
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("sweep-parallel").experiment_id])
    assert len(runs) == 2 and {run.info.status for run in runs} == {"FINISHED"}, result.stdout + result.stderr
    # Separate processes, one sweep: the same group tag in both, fixed before either trial started.
    assert_grouped_by_the_sweeps_start(runs, tmp_path / "multirun", started, int(time.time()))
