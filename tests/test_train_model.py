"""Training: `kiln.training.train(cfg)` on configs composed from conf/train_model.yaml for the
library's behaviour, and `python src/train_model.py` end to end for the command's contract (exit
codes, messages, environment, SIGKILL and resume); a real MLflow server and the ./mlruns file store."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

import kiln
from conftest import client_for, run_app, steps, wait_for_logged_epoch
from kiln.cli import compose_config
from kiln.training import train

# A small but real run: 600 training and 300 test images of the sample per epoch.
QUICK = ("train_limit=600", "test_limit=300")


def train_args(processed: Path, tmp_path: Path, *overrides: str) -> list[str]:
    return [
        f"data_dir_path={processed}",
        f"artifact_dir_path={tmp_path / 'models'}",
        f"log_dir={tmp_path / 'logs'}",
        *QUICK,
        *overrides,
    ]


def train_config(processed: Path, tmp_path: Path, *overrides: str):
    """conf/train_model.yaml with the overrides `train_args` gives the command."""
    return compose_config("train_model", train_args(processed, tmp_path, *overrides))


def tracked_config(processed: Path, tmp_path: Path, uri: str, experiment: str, *overrides: str):
    """`train_config` tracked to ``uri`` in ``experiment``."""
    return train_config(processed, tmp_path, f"mlflow_tracking_uri={uri}", f"mlflow_exp_name={experiment}", *overrides)


@pytest.fixture
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the working dir, where the default ./mlruns goes; MLflow's file store allowed
    as kiln allows it, without leaving the variable set for later tests."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return tmp_path


def only_run(client, experiment: str = "kiln"):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def test_tracked_run_logs_params_metrics_artifacts_and_a_loadable_model(
    tmp_path: Path, processed_sample: Path, mlflow_server: str
) -> None:
    experiment = "tracked-run"
    env = {"JOB_UUID": "job-123", "JOB_NAME": "kiln-train"}
    result = run_app(
        "train_model.py",
        *train_args(processed_sample, tmp_path, f"mlflow_tracking_uri={mlflow_server}", "epochs=2"),
        f"mlflow_exp_name={experiment}",
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # A normal run prints no advisory warnings: MLflow's "Add type hints to the `predict` method" came
    # twice per run before the pyfunc model's predict was type-hinted.
    output = result.stdout + result.stderr
    assert "Add type hints" not in output and "Warning:" not in output, output
    client = client_for(mlflow_server)
    run = only_run(client, experiment)
    assert re.fullmatch(r"train-model-\d+", run.info.run_name)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (
        params["learning_rate"] == "1.3" and params["train_batch_size"] == "32" and params["test_batch_size"] == "100"
    )
    assert params["model"] == "mnist_cnn" and params["device"] == "cpu" and params["seed"] == "1111"
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert steps(client, run.info.run_id, key) == [1, 2], key
    assert "batch_loss" not in run.data.metrics  # per-step metrics are autologging's (mlflow_autolog: true)
    assert run.data.tags["job_uuid"] == "job-123" and run.data.tags["job_name"] == "kiln-train"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"train_model_config.json", "checkpoint", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/loss_accuracy.png", "plots/confusion_matrix.png"}
    config = json.loads(
        Path(client.download_artifacts(run.info.run_id, "train_model_config.json", str(tmp_path))).read_text()
    )
    assert config["lr"] == 1.3 and config["epochs"] == 2

    # The checkpoint: torch.load(weights_only=True) reads it, no code unpickled.
    checkpoint = torch.load(tmp_path / "models" / run.info.run_id / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["classes"] == kiln.read_manifest(processed_sample).classes
    assert set(checkpoint["optimizer"]) == {"state", "param_groups"}

    # The pyfunc model predicts in a fresh process, in the precision serving picks by default.
    script = textwrap.dedent(
        f"""
        import mlflow, torch, kiln
        from kiln.precision import load_predictor
        mlflow.set_tracking_uri({mlflow_server!r})
        model = mlflow.pyfunc.load_model("runs:/{run.info.run_id}/model")
        (spec,) = model.metadata.get_input_schema().inputs  # kiln's explicit signature
        assert (str(spec.type), spec.shape) == ("uint8", (-1, 1, 28, 28)), (spec.type, spec.shape)
        images, labels = kiln.load_split({str(processed_sample)!r}, "test")
        out = model.predict(images[:200].numpy())
        classes = kiln.read_manifest({str(processed_sample)!r}).classes
        hits = sum(p == classes[int(l)] for p, l in zip(out["prediction"], labels[:200]))
        served = load_predictor({str(tmp_path / "models" / run.info.run_id / "checkpoint.pt")!r}, no_cuda=True)
        gap = (torch.tensor(list(out["probabilities"])) - served.predict(images[:200])).abs().max().item()
        print(len(out), hits, float(out["probability"].min()), len(out["probabilities"][0]), gap)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    count, hits, min_probability, width, gap = done.stdout.split()
    assert int(count) == 200 and int(width) == 10
    assert int(hits) > 100  # far above the 10% of guessing after two short epochs
    assert 0 < float(min_probability) <= 1
    assert float(gap) < 1e-6  # the pyfunc model answers as serving's default rule (kiln.precision)


def test_default_file_store_works_out_of_the_box_and_shows_in_the_ui(tmp_path: Path, processed_sample: Path) -> None:
    from conftest import MlflowServer

    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_ALLOW_FILE_STORE"}
    result = run_app(
        "train_model.py", *train_args(processed_sample, tmp_path, "epochs=1"), cwd=tmp_path, env=env, replace_env=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # What `MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri ./mlruns` serves (the README's command).
    ui = MlflowServer(
        tmp_path, "--backend-store-uri", str(tmp_path / "mlruns"), env={"MLFLOW_ALLOW_FILE_STORE": "true"}
    )
    try:
        client = client_for(ui.uri)
        run = only_run(client)
        assert steps(client, run.info.run_id, "test_accuracy") == [1]
    finally:
        ui.stop()


def test_sweep_style_run_is_named_and_tagged(
    tmp_path: Path,
    processed_sample: Path,
    mlflow_server: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    experiment = "hp-tagging"
    monkeypatch.setenv("MLFLOW_HPTUNING_TAG", "sweep-42")
    train(tracked_config(processed_sample, tmp_path, mlflow_server, experiment, "epochs=1"))
    run = only_run(client_for(mlflow_server), experiment)
    assert re.fullmatch(r"train-model-hp-\d+", run.info.run_name)
    assert run.data.tags["hptuning_tag"] == "sweep-42"
    assert "Logging the MLflow model failed" not in caplog.text  # the pyfunc model was logged in-process too


def test_unreachable_server_fails_before_training_naming_the_uri(tmp_path: Path, processed_sample: Path) -> None:
    from conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_app(
        "train_model.py", *train_args(processed_sample, tmp_path, f"mlflow_tracking_uri={uri}"), cwd=tmp_path
    )
    assert result.returncode != 0
    assert uri in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models").exists()
    assert time.monotonic() - started < 60


def test_untracked_training_writes_the_checkpoint_only(in_tmp_path: Path, processed_sample: Path) -> None:
    result = train(train_config(processed_sample, in_tmp_path, "setup_mlflow=false", "epochs=1"))
    assert not (in_tmp_path / "mlruns").exists()
    assert result["run_id"] is None and result["checkpoint"] == str(in_tmp_path / "models" / "checkpoint.pt")
    assert torch.load(in_tmp_path / "models" / "checkpoint.pt", weights_only=True)["epoch"] == 1


def composed(tmp_path: Path, *overrides: str) -> dict:
    """The config the real `python src/train_model.py <overrides>` runs with (`--cfg job`)."""
    result = run_app("train_model.py", *overrides, "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return yaml.safe_load(result.stdout)


@pytest.mark.parametrize(
    "key",
    [
        "artifact_dir_path",
        "train_model.artifact_dir_path",
        "model_checkpoint_dir_path",
        "train_model.model_checkpoint_dir_path",
    ],
)
def test_checkpoint_dir_takes_kilns_and_the_run_ai_guides_spelling(tmp_path: Path, key: str) -> None:
    config = composed(tmp_path, f"{key}={tmp_path / 'checkpoints'}")
    assert config["artifact_dir_path"] == str(tmp_path / "checkpoints")
    assert "model_checkpoint_dir_path" not in config  # one key in the composed and logged config


def test_given_both_checkpoint_dir_spellings_the_later_one_wins(tmp_path: Path) -> None:
    config = composed(tmp_path, "train_model.model_checkpoint_dir_path=/first", "artifact_dir_path=/second")
    assert config["artifact_dir_path"] == "/second"
    config = composed(tmp_path, "artifact_dir_path=/first", "model_checkpoint_dir_path=/second")
    assert config["artifact_dir_path"] == "/second"


def test_run_ai_guides_checkpoint_dir_override_trains_into_that_dir(tmp_path: Path, processed_sample: Path) -> None:
    checkpoints = tmp_path / "guide-models"
    result = run_app(
        "train_model.py",
        f"train_model.data_dir_path={processed_sample}",
        "train_model.setup_mlflow=false",
        f"train_model.model_checkpoint_dir_path={checkpoints}",
        "train_model.epochs=1",
        *QUICK,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert torch.load(checkpoints / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "models").exists()


def test_diverging_loss_stops_the_run_with_a_clear_error(
    tmp_path: Path, processed_sample: Path, mlflow_server: str
) -> None:
    experiment = "diverging"
    result = run_app(
        "train_model.py",
        *train_args(processed_sample, tmp_path, f"mlflow_tracking_uri={mlflow_server}", "lr=1e30", "epochs=2"),
        f"mlflow_exp_name={experiment}",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "NaN or inf" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert only_run(client_for(mlflow_server), experiment).info.status == "FAILED"


def test_sigkill_mid_epoch_then_resume_gives_contiguous_steps(
    tmp_path: Path, processed_sample: Path, mlflow_server: str
) -> None:
    from conftest import REPO

    experiment = "killed-and-resumed"
    args = train_args(
        processed_sample, tmp_path, f"mlflow_tracking_uri={mlflow_server}", f"mlflow_exp_name={experiment}"
    )
    args = [a for a in args if not a.startswith(("train_limit", "test_limit"))] + ["test_limit=200"]
    job = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "src" / "train_model.py"),
            *args,
            "epochs=20",
            f"hydra.run.dir={tmp_path / 'out1'}",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = client_for(mlflow_server)
    run_id = wait_for_logged_epoch(client, experiment, job)
    time.sleep(0.4)  # into the next epoch
    job.send_signal(signal.SIGKILL)
    job.wait()
    completed = torch.load(tmp_path / "models" / run_id / "checkpoint.pt", weights_only=True)["epoch"]
    assert completed >= 1

    result = run_app("train_model.py", *args, "resume=true", "epochs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run = only_run(client, experiment)
    assert run.info.run_id == run_id
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert steps(client, run_id, key) == list(range(1, completed + 3)), key
    assert torch.load(tmp_path / "models" / run_id / "checkpoint.pt", weights_only=True)["epoch"] == completed + 2
    predictor = kiln.Predictor(tmp_path / "models" / run_id / "checkpoint.pt")
    assert predictor.epoch == completed + 2


def test_resume_logs_an_epoch_that_was_checkpointed_but_not_logged(
    tmp_path: Path, processed_sample: Path, mlflow_server: str
) -> None:
    """The job died between writing epoch 2's checkpoint and logging epoch 2's metrics."""
    import mlflow

    experiment = "checkpointed-not-logged"
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment(experiment)
    trainer = kiln.Trainer(processed_sample, seed=5, train_limit=300, test_limit=100)
    first, second = trainer.run_epoch(), trainer.run_epoch()
    with mlflow.start_run(run_name=f"train-model-{int(time.time())}") as run:
        mlflow.log_metrics(
            {k: first[k] for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")}, step=1
        )
    (tmp_path / "models" / run.info.run_id).mkdir(parents=True)
    trainer.save_checkpoint(tmp_path / "models" / run.info.run_id / "checkpoint.pt")

    overrides = ("resume=true", "epochs=1", "seed=5", "train_limit=300", "test_limit=100")
    result = train(tracked_config(processed_sample, tmp_path, mlflow_server, experiment, *overrides))
    assert result["run_id"] == run.info.run_id and result["epoch"] == 3
    client = client_for(mlflow_server)
    assert steps(client, run.info.run_id, "test_loss") == [1, 2, 3]
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "test_loss")}
    assert logged[2] == pytest.approx(second["test_loss"])


def test_resume_without_an_earlier_run_starts_fresh_and_says_so(
    in_tmp_path: Path, processed_sample: Path, caplog: pytest.LogCaptureFixture
) -> None:
    result = train(train_config(processed_sample, in_tmp_path, "resume=true", "epochs=1"))
    assert result["epoch"] == 1
    assert "has no run named train-model-<time>; starting a new run" in caplog.text


def test_autolog_logs_step_metrics_from_the_training_loop(in_tmp_path: Path, processed_sample: Path) -> None:
    tmp_path = in_tmp_path
    overrides = ("mlflow_autolog=true", "log_every_n_steps=5", "epochs=2")
    result = run_app("train_model.py", *train_args(processed_sample, tmp_path, *overrides), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    client = client_for(f"file://{tmp_path / 'mlruns'}")
    run = only_run(client)
    # 600 training images in batches of 32: 19 batches an epoch, so steps 5, 10, ... 35 over two epochs.
    expected_steps = list(range(5, 2 * 19 + 1, 5))
    for key in ("batch_loss", "learning_rate", "images_per_second"):
        assert steps(client, run.info.run_id, key) == expected_steps, key
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "learning_rate")}
    assert history[15] == pytest.approx(1.3) and history[20] == pytest.approx(1.3 * 0.7)  # epoch 2 starts at 20
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "batch_loss")]
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, "images_per_second"))
    assert steps(client, run.info.run_id, "train_loss") == [1, 2]  # the epoch metrics are as without autolog


def test_kiln_adadelta_matches_torch_step_for_step() -> None:
    from kiln._core import Adadelta

    torch.manual_seed(0)
    ours = torch.randn(3000, requires_grad=True)
    theirs = ours.detach().clone().requires_grad_(True)
    kiln_optimizer = Adadelta([ours], lr=1.3, weight_decay=0.01)
    torch_optimizer = torch.optim.Adadelta([theirs], lr=1.3, weight_decay=0.01, foreach=False)
    for _ in range(50):
        grad = torch.randn(3000)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        kiln_optimizer.step()
        torch_optimizer.step()
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # The state dict has torch.optim.Adadelta's layout: it loads there and continues identically.
    restored = torch.optim.Adadelta([theirs], lr=0.1)
    restored.load_state_dict(kiln_optimizer.state_dict())
    assert restored.param_groups[0]["lr"] == 1.3
    assert torch.equal(restored.state[theirs]["square_avg"], kiln_optimizer.state_dict()["state"][0]["square_avg"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpoint_loads_into_the_python_definition_of_the_model(
    tmp_path: Path, processed_sample: Path, precision: str
) -> None:
    import torch.nn.functional as F
    from torch import nn

    trainer = kiln.Trainer(processed_sample, train_limit=300, test_limit=100, precision=precision)
    trainer.run_epoch()
    trainer.save_checkpoint(tmp_path / "checkpoint.pt")

    class Net(nn.Module):  # pytorch/examples mnist/main.py
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
            self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
            return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))

    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    # bf16 training computes with bf16 working copies; the checkpoint holds the float32 weights.
    assert {tensor.dtype for tensor in checkpoint["model"]["state_dict"].values()} == {torch.float32}
    net = Net().eval()
    net.load_state_dict(checkpoint["model"]["state_dict"])
    images, _ = kiln.load_split(processed_sample, "test")
    mean, std = checkpoint["normalization"]["mean"][0], checkpoint["normalization"]["std"][0]
    with torch.no_grad():
        expected = torch.softmax(net((images[:50].float() / 255 - mean) / std), dim=1)
    assert torch.allclose(kiln.Predictor(tmp_path / "checkpoint.pt").predict(images[:50]), expected, atol=1e-5)


def test_same_seed_same_metrics_and_subsets(processed_sample: Path) -> None:
    first = kiln.Trainer(processed_sample, seed=9, train_limit=200, test_limit=100).run_epoch()
    second = kiln.Trainer(processed_sample, seed=9, train_limit=200, test_limit=100).run_epoch()
    assert first["train_loss"] == second["train_loss"] and first["test_loss"] == second["test_loss"]


def test_ctrl_c_stops_an_epoch_and_keeps_the_trainer_consistent(processed_sample: Path) -> None:
    trainer = kiln.Trainer(processed_sample, train_limit=600, test_limit=100)

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.run_epoch(progress=interrupt)
    assert trainer.epoch == 0 and trainer.history == []


def test_an_error_in_the_step_callback_stops_the_epoch_and_is_raised_as_it_was(processed_sample: Path) -> None:
    trainer = kiln.Trainer(processed_sample, train_limit=600, test_limit=100)
    reports = []

    def on_steps(metrics: dict[str, float]) -> None:
        reports.append(metrics)
        raise ValueError("cannot log this step")

    with pytest.raises(ValueError, match="cannot log this step"):
        trainer.run_epoch(on_steps=on_steps, every_n_steps=4)
    assert [report["step"] for report in reports] == [4]
    assert trainer.epoch == 0 and trainer.history == []


def test_missing_dataset_fails_clearly_and_leaves_no_run(tmp_path: Path) -> None:
    missing = tmp_path / "no-processed-data"
    result = run_app("train_model.py", f"data_dir_path={missing}", "epochs=1", cwd=tmp_path)
    assert result.returncode != 0
    assert str(missing) in result.stdout + result.stderr and "run process_data first" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlruns").exists()


def test_resume_of_a_run_without_checkpoint_starts_a_new_run(
    tmp_path: Path, processed_sample: Path, mlflow_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    import mlflow

    experiment = "no-checkpoint"
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"train-model-{int(time.time())}") as earlier:
        mlflow.log_metric("test_loss", 1.0, step=1)
    train(tracked_config(processed_sample, tmp_path, mlflow_server, experiment, "resume=true", "epochs=1"))
    assert "no checkpoint found" in caplog.text
    client = client_for(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    newer = [run for run in runs if run.info.run_id != earlier.info.run_id]
    assert len(runs) == 2 and len(newer) == 1
    assert steps(client, newer[0].info.run_id, "test_loss") == [1]
    assert steps(client, earlier.info.run_id, "test_loss") == [1]
