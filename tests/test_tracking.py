"""kiln.tracking piece by piece, against the session's real MLflow server: run names and tags,
finding the run and the checkpoint to resume, the epochs a killed job did not log, restarting a run,
ending a failed one, and a sweep trial's tags."""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import client_for, free_port, steps
from kiln import general_utils, tracking
from kiln.tracking import SweepTrial, Tracking, TrackingError


@pytest.fixture(autouse=True)
def no_job_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's job variables unset, whatever the shell running the tests has."""
    for variable in ("MLFLOW_HPTUNING_TAG", "JOB_UUID", "JOB_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def experiment(mlflow_server: str):
    """A new experiment on the session's server, MLflow's current one; no run is left active after."""
    import mlflow

    name = f"tracking-{uuid.uuid4().hex[:12]}"
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment(name)
    yield name
    while mlflow.active_run() is not None:
        mlflow.end_run()


def open_run(uri: str, experiment: str, *, resume: bool = False, hptuning_tag: str | None = None) -> Tracking:
    return tracking.open_run(uri, experiment, "train-model", autolog=False, resume=resume, hptuning_tag=hptuning_tag)


def make_run(client, experiment: str, name: str, metrics: dict[str, list[int]] | None = None) -> str:
    """A finished run called ``name`` with each metric logged at the given steps; returns its id."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    for key, logged_steps in (metrics or {}).items():
        for step in logged_steps:
            client.log_metric(run_id, key, 0.5, step=step)
    client.set_terminated(run_id)
    time.sleep(0.01)  # start times are in ms: the next run is newer
    return run_id


def epoch(number: int, loss: float) -> dict[str, float]:
    return {
        "epoch": number,
        "train_loss": loss,
        "train_accuracy": 0.5,
        "test_loss": loss + 0.1,
        "test_accuracy": 0.6,
        "seconds": 1.0,
    }


def test_run_name_gets_hp_only_for_tuning_and_job_tags_leave_out_unset_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert tracking.run_base_name("train-model", None) == "train-model"
    assert tracking.run_base_name("train-model", "sweep-1") == "train-model-hp"
    assert tracking.run_base_name("train-model", "") == "train-model-hp"  # MLFLOW_HPTUNING_TAG set but empty
    assert tracking.job_tags(None) == {}
    assert tracking.job_tags("") == {}
    monkeypatch.setenv("JOB_UUID", "uuid-7")
    monkeypatch.setenv("JOB_NAME", "")
    assert tracking.job_tags("sweep-1") == {"hptuning_tag": "sweep-1", "job_uuid": "uuid-7"}


def test_new_run_is_named_with_the_time_and_tagged_from_the_job_environment(
    mlflow_server: str, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.setenv("JOB_UUID", "job-123")
    monkeypatch.setenv("JOB_NAME", "kiln-train")
    before = int(time.time())
    run = open_run(mlflow_server, experiment)
    mlflow.end_run()
    assert run.tracked and run.step_offset == 0 and run.base_name == "train-model" and run.hptuning_tag is None
    logged = client_for(mlflow_server).get_run(run.run_id)
    match = re.fullmatch(r"train-model-(\d+)", logged.info.run_name)
    assert match and before <= int(match[1]) <= int(time.time())
    assert logged.data.tags["job_uuid"] == "job-123" and logged.data.tags["job_name"] == "kiln-train"
    assert "hptuning_tag" not in logged.data.tags
    assert client_for(mlflow_server).get_experiment(logged.info.experiment_id).name == experiment


def test_a_sweeps_tag_is_an_argument_and_the_environment_is_only_read(mlflow_server: str, experiment: str) -> None:
    import mlflow

    run = open_run(mlflow_server, experiment, hptuning_tag="/sweeps/2024")
    mlflow.end_run()
    logged = client_for(mlflow_server).get_run(run.run_id)
    assert re.fullmatch(r"train-model-hp-\d+", logged.info.run_name)
    assert logged.data.tags["hptuning_tag"] == "/sweeps/2024"
    assert "MLFLOW_HPTUNING_TAG" not in os.environ


def test_mlflow_init_keeps_the_template_signature_and_reads_mlflow_hptuning_tag(
    mlflow_server: str, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_HPTUNING_TAG", "sweep-42")
    init_success, mlflow_run, step_offset = general_utils.mlflow_init(
        mlflow_server, experiment, "train-model", setup_mlflow=True
    )
    mlflow.end_run()
    assert init_success is True and step_offset == 0
    logged = client_for(mlflow_server).get_run(mlflow_run.info.run_id)
    assert re.fullmatch(r"train-model-hp-\d+", logged.info.run_name)
    assert logged.data.tags["hptuning_tag"] == "sweep-42"
    assert general_utils.mlflow_init(mlflow_server, experiment, "train-model") == (False, None, 0)


def test_untracked_logging_does_nothing_and_a_failing_call_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert general_utils.mlflow_init("./never-created", "kiln", "train-model") == (False, None, 0)
    tracking.UNTRACKED.log("no_such_function", value=1)
    assert not Path("never-created").exists()
    tracking.log(True, "no_such_function", value=1)
    general_utils.mlflow_log(True, "no_such_function", value=1)
    failures = [
        r for r in caplog.records if r.levelno == logging.ERROR and "mlflow.no_such_function failed" in r.message
    ]
    assert len(failures) == 2


def test_an_unreachable_server_is_named_at_once(caplog: pytest.LogCaptureFixture) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError, match=re.escape(f"MLflow tracking server {uri} is unreachable")):
        tracking.check_tracking_server(uri)
    run = open_run(uri, "kiln")
    assert not run.tracked and run.run is None
    assert any(r.levelno == logging.ERROR and uri in r.getMessage() for r in caplog.records)
    assert time.monotonic() - started < 30


def test_resume_reopens_the_newest_run_of_the_name_after_its_last_training_step(
    mlflow_server: str, experiment: str
) -> None:
    import mlflow

    client = client_for(mlflow_server)
    make_run(client, experiment, "train-model-100", {"test_loss": [1, 2, 3, 4, 5]})
    wanted = make_run(client, experiment, "train-model-200", {"train_loss": [1, 2], "test_accuracy": [1, 2, 3]})
    client.log_metric(wanted, "system/cpu_utilization_percentage", 3.0, step=50)  # counts its own steps
    client.log_metric(wanted, "learning_rate_schedule", 0.1, step=99)  # not one of kiln's metrics
    hp_run = make_run(client, experiment, "train-model-hp-300", {"test_loss": [7]})
    make_run(client, experiment, "train-model-other-400", {"test_loss": [8]})

    assert tracking.last_logged_step(client, wanted) == 3
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    assert tracking.latest_run_named(client, experiment_id, "train-model-hp").info.run_id == hp_run
    assert tracking.latest_run_named(client, experiment_id, "evaluate") is None

    resumed = open_run(mlflow_server, experiment, resume=True)
    assert mlflow.active_run().info.run_id == resumed.run_id == wanted
    assert resumed.step_offset == 3 and resumed.base_name == "train-model"


def test_resume_without_a_run_of_that_name_starts_a_new_run_and_says_so(
    mlflow_server: str, experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    run = open_run(mlflow_server, experiment, resume=True)
    assert run.tracked and run.step_offset == 0
    assert re.fullmatch(r"train-model-\d+", client_for(mlflow_server).get_run(run.run_id).info.run_name)
    assert f"resume=true but experiment '{experiment}' has no run named train-model-<time>; starting a new run" in (
        caplog.text
    )


def test_checkpoint_is_the_local_copy_else_the_runs_artifact_downloaded_in_place(
    tmp_path: Path, mlflow_server: str, experiment: str
) -> None:
    client = client_for(mlflow_server)
    with_checkpoint = make_run(client, experiment, "train-model-1")
    logged = tmp_path / "logged" / tracking.CHECKPOINT_NAME
    logged.parent.mkdir()
    logged.write_bytes(b"the run's checkpoint")
    client.log_artifact(with_checkpoint, str(logged), artifact_path=tracking.CHECKPOINT_ARTIFACT_DIR)
    without_checkpoint = make_run(client, experiment, "train-model-2")

    models = tmp_path / "models"
    assert tracking.local_checkpoint(models, None) == models / "checkpoint.pt"
    local = tracking.local_checkpoint(models, with_checkpoint)
    assert local == models / with_checkpoint / "checkpoint.pt"
    assert tracking.find_checkpoint(local, None) is None
    assert tracking.find_checkpoint(local, with_checkpoint) == local
    assert local.read_bytes() == b"the run's checkpoint"
    assert [p.name for p in local.parent.iterdir()] == ["checkpoint.pt"]  # no partial download left

    local.write_bytes(b"this machine's newer checkpoint")
    assert tracking.find_checkpoint(local, with_checkpoint) == local
    assert local.read_bytes() == b"this machine's newer checkpoint"
    assert tracking.find_checkpoint(tracking.local_checkpoint(models, without_checkpoint), without_checkpoint) is None


def test_epochs_checkpointed_but_not_logged_are_logged_and_nothing_twice(
    mlflow_server: str, experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    import mlflow

    client = client_for(mlflow_server)
    history = [epoch(1, 0.9), epoch(2, 0.7), epoch(3, 0.5)]
    with mlflow.start_run() as active:
        resumed = Tracking(tracked=True, run=active, step_offset=1, base_name="train-model")
        tracking.log_missed_epochs(resumed, history, checkpoint_epoch=3)
    for key in tracking.TRAINING_METRICS:
        assert steps(client, active.info.run_id, key) == [2, 3], key
    assert {m.step: m.value for m in client.get_metric_history(active.info.run_id, "test_loss")} == {
        2: pytest.approx(0.8),
        3: pytest.approx(0.6),
    }
    assert "logged again" not in caplog.text

    with mlflow.start_run() as ahead:
        tracking.log_missed_epochs(Tracking(tracked=True, run=ahead, step_offset=5), history, checkpoint_epoch=3)
    assert steps(client, ahead.info.run_id, "test_loss") == []
    assert "MLflow run has steps up to 5 but the checkpoint is at epoch 3; epochs 4..5 will be logged again" in (
        caplog.text
    )


def test_restart_ends_the_reopened_run_and_starts_one_of_the_same_name_and_group(
    mlflow_server: str, experiment: str
) -> None:
    import mlflow

    client = client_for(mlflow_server)
    earlier = make_run(client, experiment, "train-model-hp-1", {"test_loss": [1, 2]})
    reopened = open_run(mlflow_server, experiment, resume=True, hptuning_tag="group")
    assert reopened.run_id == earlier and reopened.step_offset == 2
    restarted = tracking.restart_run(reopened)
    assert mlflow.active_run().info.run_id == restarted.run_id != earlier
    assert restarted.step_offset == 0 and restarted.base_name == "train-model-hp"
    mlflow.end_run()
    new = client.get_run(restarted.run_id)
    assert re.fullmatch(r"train-model-hp-\d+", new.info.run_name) and new.data.tags["hptuning_tag"] == "group"
    assert client.get_run(earlier).info.status == "FINISHED"
    assert steps(client, earlier, "test_loss") == [1, 2]


@pytest.mark.parametrize(
    ("error", "status", "tag"),
    [
        (ValueError("bad data"), "FAILED", "ValueError: bad data"),
        (KeyboardInterrupt(), "KILLED", "KeyboardInterrupt: "),
    ],
)
def test_a_failed_job_ends_its_run_with_the_status_and_the_error(
    mlflow_server: str, experiment: str, error: BaseException, status: str, tag: str
) -> None:
    import mlflow

    run = open_run(mlflow_server, experiment)
    tracking.end_failed(run, error)
    assert mlflow.active_run() is None
    logged = client_for(mlflow_server).get_run(run.run_id)
    assert logged.info.status == status and logged.data.tags["kiln.error"] == tag
    tracking.end_failed(tracking.UNTRACKED, error)  # nothing to end


def test_a_sweep_trial_is_grouped_by_the_start_time_its_sweep_recorded_unless_the_user_set_a_tag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A relative sweep dir, as Hydra's default multirun/<date>/<time>: relative to where the command ran.
    hydra_config = OmegaConf.create(
        {
            "sweep": {"dir": "multirun/2024-06-01"},
            "runtime": {"cwd": str(tmp_path)},
            "job": {"num": 2},
            "sweeper": {"study_name": "base-template"},
        }
    )
    monkeypatch.chdir(tmp_path)
    started = int(time.time())
    tracking.RecordSweepStart().on_multirun_start(OmegaConf.create({"hydra": hydra_config}))
    recorded = (tmp_path / "multirun" / "2024-06-01" / "hptuning_tag").read_text().strip()
    assert started <= int(recorded) <= time.time()
    assert os.listdir(tmp_path / "multirun" / "2024-06-01") == ["hptuning_tag"]  # no partial file left

    monkeypatch.chdir(tmp_path / "multirun")  # a trial's working dir may be its own (hydra.job.chdir)
    trial = SweepTrial.from_hydra(hydra_config)
    assert trial == SweepTrial(
        hptuning_tag=recorded, number=2, study_name="base-template", sweep_dir="multirun/2024-06-01"
    )
    assert trial.tags == {"trial_number": "2", "study_name": "base-template", "hptuning_dir": "multirun/2024-06-01"}
    assert "MLFLOW_HPTUNING_TAG" not in os.environ

    monkeypatch.setenv("MLFLOW_HPTUNING_TAG", "the-user's-group")
    assert SweepTrial.from_hydra(hydra_config).hptuning_tag == "the-user's-group"
    monkeypatch.delenv("MLFLOW_HPTUNING_TAG")

    # Without the callback's record (taken out of hydra.callbacks), the sweep dir groups, with a warning.
    no_record = OmegaConf.create({"sweep": {"dir": str(tmp_path / "other")}, "job": {"num": 0}, "sweeper": {}})
    with caplog.at_level(logging.WARNING, logger="kiln.tracking"):
        fallback = SweepTrial.from_hydra(no_record)
    assert fallback.hptuning_tag == str(tmp_path / "other") and "RecordSweepStart" in caplog.text
    assert fallback.tags == {"trial_number": "0", "hptuning_dir": str(tmp_path / "other")}
