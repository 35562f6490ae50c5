"""Everything downstream of training for a torchvision architecture (issue 13, item 4): resnet18 trained by
the real train_model.py on the sample as 32 px RGB records its model parameters in MLflow, and its pyfunc
model, batch_inferencing.py and the gunicorn server give the same answers, in bf16 where the CPU computes it
natively; int8 is mnist_cnn's alone, so `auto` falls back saying why and a forced int8 is refused before
anything is served. The --multirun sweep searches `model` beside the template's lr and train_bs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch
import yaml

import kiln
from conftest import TrackedRun, client_for, copy_sample, run_app, train_tracked
from kiln.precision import load_predictor, resolve_precision
from test_serving import ModelServer, call, json_batch

# What `auto` picks on this machine's CPU where int8 cannot run: bf16 with AVX-512 bf16, fp32 without.
FLOAT_AUTO = resolve_precision("auto", "cpu")
NO_INT8 = "int8 inference covers mnist_cnn, not resnet18"


@pytest.fixture(scope="module")
def rgb32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes of the sample, 10 images each per split, prepared as 32x32 RGB (the raw files are 28 px
    grayscale, so every image is converted as a user's photos of another size would be)."""
    root = tmp_path_factory.mktemp("rgb32")
    raw = copy_sample(root / "raw", per_class=10, classes=3)
    processed = root / "processed"
    kiln.prepare_dataset(raw, processed, image_size=(32, 32), channels=3)
    return processed


@pytest.fixture(scope="module")
def resnet18_run(tmp_path_factory: pytest.TempPathFactory, rgb32: Path, mlflow_server: str) -> TrackedRun:
    """One epoch of `python src/train_model.py model=resnet18 optimizer=sgd`, tracked by the MLflow server."""
    overrides = (f"data_dir_path={rgb32}", "model=resnet18", "optimizer=sgd", "lr=0.01", "train_bs=8", "epochs=1")
    return train_tracked(tmp_path_factory.mktemp("resnet18-run"), mlflow_server, "downstream-resnet18", *overrides)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, resnet18_run: TrackedRun):
    """gunicorn serving the resnet18 checkpoint with the default settings (PRECISION=auto)."""
    running = ModelServer(
        tmp_path_factory.mktemp("resnet18-server"),
        {"PRED_MODEL_PATH": str(resnet18_run.checkpoint), "PRED_MODEL_UUID": resnet18_run.run_id},
        workers=1,
    )
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_the_run_records_its_model_and_its_pyfunc_model_predicts_as_the_server_does(
    resnet18_run: TrackedRun, rgb32: Path, mlflow_server: str
) -> None:
    params = client_for(mlflow_server).get_run(resnet18_run.run_id).data.params
    assert params["model"] == "resnet18"
    assert params["optimizer"] == "sgd"
    assert params["pretrained"] == "none"

    # In a fresh process, as a user loads it: the pyfunc model of the run, on the processed test images.
    script = textwrap.dedent(
        f"""
        import json, mlflow, kiln
        mlflow.set_tracking_uri({mlflow_server!r})
        model = mlflow.pyfunc.load_model("runs:/{resnet18_run.run_id}/model")
        (spec,) = model.metadata.get_input_schema().inputs
        images, _ = kiln.load_split({str(rgb32)!r}, "test")
        out = model.predict(images.numpy())
        print(json.dumps({{"shape": list(spec.shape), "prediction": list(out["prediction"]),
                          "probabilities": [list(map(float, row)) for row in out["probabilities"]]}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.splitlines()[-1])
    assert answer["shape"] == [-1, 3, 32, 32]

    images, _ = kiln.load_split(rgb32, "test")
    served = load_predictor(resnet18_run.checkpoint, no_cuda=True)
    expected = served.predict(images)
    assert served.precision == FLOAT_AUTO
    assert answer["prediction"] == [served.classes[int(i)] for i in expected.argmax(1)]
    torch.testing.assert_close(torch.tensor(answer["probabilities"]), expected, atol=1e-5, rtol=0)
    # Not a model that answers the same for every image, which would make the equalities above hollow.
    assert expected.std(0).max() > 1e-3


def test_the_server_answers_as_batch_inference_and_the_predictor(
    server: ModelServer, resnet18_run: TrackedRun, rgb32: Path, tmp_path: Path
) -> None:
    raw_test = rgb32.parent / "raw" / "test"
    files = sorted(raw_test.rglob("*.png"))
    result = run_app(
        "batch_inferencing.py",
        f"inference.model_path={resnet18_run.checkpoint}",
        f"inference.input_data_dir={raw_test}",
        "inference.file_check_glob=**/*.png",
        f"log_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in (tmp_path / "outputs" / "batch-infer-res.jsonl").read_text().splitlines()]
    batch = {Path(line["filepath"]): line for line in lines}
    assert sorted(batch) == files

    # The raw 28 px grayscale files, sent as users send photos: the server converts them to 32 px RGB as
    # preparation and batch inference did.
    status, body = call(f"{server.url}/api/v1/model/predict", json_batch(files))
    assert status == 200, body
    for file, item in zip(files, body["data"], strict=True):
        assert item["prediction"] == batch[file]["prediction"], file
        # bf16 results may differ in the last bits with the batch the images are predicted in.
        assert item["probability"] == pytest.approx(batch[file]["probability"], abs=2e-3)

    # The processed images as UINT8 [N, 3, 32, 32] tensors on the Open Inference Protocol route.
    images, _ = kiln.load_split(rgb32, "test")
    request = {"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "UINT8"}]}
    request["inputs"][0]["data"] = images.reshape(-1).tolist()
    status, answer = call(f"{server.url}/v2/models/kiln/infer", json.dumps(request).encode())
    assert status == 200, answer
    outputs = {output["name"]: output for output in answer["outputs"]}
    predictor = load_predictor(resnet18_run.checkpoint, no_cuda=True)
    expected = predictor.predict(images)
    assert outputs["prediction"]["data"] == [predictor.classes[int(i)] for i in expected.argmax(1)]
    probabilities = torch.tensor(outputs["probabilities"]["data"]).view(expected.shape)
    torch.testing.assert_close(probabilities, expected, atol=2e-3, rtol=0)


def test_auto_serves_in_the_cpu_s_float_precision_and_logs_why_not_int8(
    server: ModelServer, resnet18_run: TrackedRun
) -> None:
    status, version = call(f"{server.url}/api/v1/model/version")
    assert status == 200, version
    assert version["data"]["model_name"] == "resnet18"
    assert version["data"]["model_uuid"] == resnet18_run.run_id
    status, metadata = call(f"{server.url}/v2/models/kiln")
    assert {"name": "images", "datatype": "UINT8", "shape": [-1, 3, 32, 32]} in metadata["inputs"]
    log = server.log()
    assert f"Predicting in {FLOAT_AUTO}: no int8 here, {NO_INT8}" in log
    assert f"(resnet18, epoch 1, 3 classes, images 3x32x32, {FLOAT_AUTO})" in log


def test_forcing_int8_for_resnet18_is_refused_before_serving_or_classifying_naming_why(
    resnet18_run: TrackedRun, rgb32: Path, tmp_path: Path
) -> None:
    reason = f"cannot predict in int8 with '{resnet18_run.checkpoint}': {NO_INT8}"
    env = {"PRED_MODEL_PATH": str(resnet18_run.checkpoint), "PRED_MODEL_UUID": "", "PRECISION": "int8"}
    refused = ModelServer(tmp_path, env, workers=1)
    try:
        # A server that starts anyway is ready in seconds: that fails here at once, as does a timeout.
        with pytest.raises(RuntimeError, match="gunicorn exited with"):
            refused.wait_healthy("/v2/health/ready", timeout=90)
    finally:
        refused.stop()
    assert refused.process.returncode != 0
    assert f"kiln server not started: cannot load the model to serve: {reason}" in refused.log()

    result = run_app(
        "batch_inferencing.py",
        f"inference.model_path={resnet18_run.checkpoint}",
        f"inference.input_data_dir={rgb32.parent / 'raw' / 'test'}",
        "inference.file_check_glob=**/*.png",
        "inference.precision=int8",
        f"log_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert reason in output and "Traceback" not in output
    assert not (tmp_path / "outputs" / "batch-infer-res.jsonl").exists()


def test_a_sweep_searches_the_model_beside_lr_and_train_bs(tmp_path: Path, rgb32: Path, mlflow_server: str) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = run_app(
        "train_model.py",
        "--multirun",
        f"data_dir_path={rgb32}",
        "model=mnist_cnn,mobilenet_v3_small,resnet18",  # a choice, searched beside the seed's lr and train_bs
        "epochs=1",
        f"artifact_dir_path={tmp_path / 'models'}",
        f"log_dir={tmp_path / 'logs'}",
        f"mlflow_tracking_uri={mlflow_server}",
        "mlflow_exp_name=sweep-models",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        f"hydra.sweeper.storage={storage}",
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name="base-template", storage=storage)
    assert len(study.trials) == 3
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in study.trials)
    # The seed's sampler (TPE, seed 55) draws its first trials at random from its seed: each model once.
    assert sorted(trial.params["model"] for trial in study.trials) == ["mnist_cnn", "mobilenet_v3_small", "resnet18"]

    client = client_for(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("sweep-models").experiment_id])
    assert len(runs) == 3 and {run.info.status for run in runs} == {"FINISHED"}
    for run in runs:
        trial = study.trials[int(run.data.tags["trial_number"])]
        params = run.data.params
        assert params["model"] == trial.params["model"]
        assert float(params["learning_rate"]) == pytest.approx(trial.params["lr"])
        assert params["optimizer"] == "adadelta" and params["pretrained"] == "none"
        assert [run.data.metrics["test_loss"], run.data.metrics["test_accuracy"]] == pytest.approx(trial.values)
        saved = torch.load(tmp_path / "models" / run.info.run_id / "checkpoint.pt", weights_only=True)
        assert saved["model"]["name"] == trial.params["model"]

    # The best trials (the Pareto front of test_loss, test_accuracy) as for the template's model, with
    # the model each was trained with.
    front = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    assert sorted((s["params"]["model"], s["params"]["lr"], s["values"]) for s in front["solutions"]) == sorted(
        (t.params["model"], t.params["lr"], t.values) for t in study.best_trials
    )
