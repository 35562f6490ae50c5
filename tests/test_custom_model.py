"""Your own model from Python: `python src/train_model.py model=python:custom_models:build` trains a
module from tests/custom_models.py with kiln's C++ loop (through TorchScript), resumes it after
SIGKILL, and batch inference predicts with the checkpoint alone, without the module importable. A
module TorchScript cannot compile stops before training with one clear message."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional

import kiln
from conftest import REPO, SAMPLE, client_for, run_app, steps, wait_for_logged_epoch
from kiln import custom_model
from test_serving import IMAGES, ModelServer, call, expected, json_batch
from test_train_model import only_run, train_args

MODEL = "python:custom_models:build"
# The test's model module is importable the way a project's own package is: on PYTHONPATH.
WITH_MODELS = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def python_checkpoint(tmp_path_factory: pytest.TempPathFactory, processed_sample: Path) -> Path:
    """The checkpoint of 3 epochs of `python src/train_model.py model=python:custom_models:build`."""
    root = tmp_path_factory.mktemp("python-model")
    result = run_app(
        "train_model.py",
        *train_args(processed_sample, root, f"model={MODEL}", "setup_mlflow=false", "epochs=3"),
        cwd=root,
        env=WITH_MODELS,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "models" / "checkpoint.pt"


def test_python_model_trains_and_batch_inference_predicts_from_the_checkpoint_alone(
    tmp_path: Path, processed_sample: Path, python_checkpoint: Path
) -> None:
    checkpoint = python_checkpoint
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] == 3 and saved["model"]["name"] == MODEL
    assert saved["model"]["script"].dtype == torch.uint8
    # The weights are the Python module's, under its own names.
    import custom_models

    reference = custom_models.build(len(saved["classes"]), 1).state_dict()
    assert {k: v.shape for k, v in saved["model"]["state_dict"].items()} == {k: v.shape for k, v in reference.items()}

    images = tmp_path / "images"
    images.mkdir()
    expected = {}
    for class_dir in sorted((SAMPLE / "test").iterdir()):
        for file in sorted(class_dir.iterdir())[:10]:
            shutil.copy(file, images / f"{class_dir.name}-{file.name}")
            expected[f"{class_dir.name}-{file.name}"] = class_dir.name
    # No PYTHONPATH: the checkpoint's TorchScript is the model, custom_models is not imported.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = run_app(
        "batch_inferencing.py",
        f"inference.model_path={checkpoint}",
        f"inference.input_data_dir={images}",
        f"log_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
        env=env,
        replace_env=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in (tmp_path / "outputs" / "batch-infer-res.jsonl").read_text().splitlines()]
    assert len(lines) == len(expected)
    correct = sum(line["prediction"] == expected[Path(line["filepath"]).name] for line in lines)
    assert correct / len(lines) > 0.2, correct  # 10 classes: chance is 0.1 (3 small epochs reach ~0.3)

    # The C++ predictor gives the same answers as the Python module with the checkpoint's weights.
    model = custom_models.build(len(saved["classes"]), 1)
    model.load_state_dict(saved["model"]["state_dict"])
    model.eval()
    test_images, _ = kiln.load_split(processed_sample, "test")
    batch = test_images[:16]
    predictor = kiln.Predictor(checkpoint, precision="fp32")
    assert predictor.model_name == MODEL
    mean = torch.tensor(saved["normalization"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(saved["normalization"]["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = model((batch.float() / 255 - mean) / std)
    torch.testing.assert_close(predictor.predict(batch), torch.softmax(logits, 1), atol=1e-4, rtol=1e-4)

    # The TorchScript archive is covered by the checkpoint's checksums like every tensor.
    saved["model"]["script"][len(saved["model"]["script"]) // 2] ^= 1
    edited = tmp_path / "edited.pt"
    torch.save(saved, edited)
    with pytest.raises(kiln.DataError, match=r"tensor 'model\.script' does not match its checksum"):
        kiln.Predictor(edited)


def test_python_model_is_served_without_its_module(python_checkpoint: Path) -> None:
    # The server's environment has no PYTHONPATH to tests/: the checkpoint's TorchScript is the model.
    env = {"PRED_MODEL_PATH": str(python_checkpoint), "PRED_MODEL_UUID": "python-model"}
    server = ModelServer(python_checkpoint.parent, env, workers=1)
    try:
        server.wait_ready()
        status, body = call(f"{server.url}/api/v1/model/predict", json_batch(IMAGES))
    finally:
        server.stop()
    assert status == 200, body
    labels, probabilities = expected(python_checkpoint, IMAGES)
    assert [item["prediction"] for item in body["data"]] == labels
    for item, row in zip(body["data"], probabilities, strict=True):
        assert item["probability"] == pytest.approx(float(row.max()), abs=2e-3)


def test_python_model_resumes_after_sigkill(tmp_path: Path, processed_sample: Path, mlflow_server: str) -> None:
    experiment = "python-model-killed-and-resumed"
    args = train_args(
        processed_sample,
        tmp_path,
        f"mlflow_tracking_uri={mlflow_server}",
        f"mlflow_exp_name={experiment}",
        f"model={MODEL}",
    )
    job = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "src" / "train_model.py"),
            *args,
            "epochs=50",
            f"hydra.run.dir={tmp_path / 'out1'}",
        ],
        cwd=tmp_path,
        env={**os.environ, **WITH_MODELS},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = client_for(mlflow_server)
    run_id = wait_for_logged_epoch(client, experiment, job)
    job.send_signal(signal.SIGKILL)
    job.wait()
    checkpoint = tmp_path / "models" / run_id / "checkpoint.pt"
    completed = torch.load(checkpoint, weights_only=True)["epoch"]
    assert completed >= 1

    result = run_app("train_model.py", *args, "resume=true", "epochs=2", cwd=tmp_path, env=WITH_MODELS)
    assert result.returncode == 0, result.stdout + result.stderr
    run = only_run(client, experiment)
    assert run.info.run_id == run_id
    assert run.data.params["model"] == MODEL
    for key in ("train_loss", "test_accuracy"):
        assert steps(client, run_id, key) == list(range(1, completed + 3)), key
    assert kiln.Predictor(checkpoint).epoch == completed + 2


def test_module_torchscript_cannot_compile_fails_before_training_naming_it(
    tmp_path: Path, processed_sample: Path
) -> None:
    model = "python:custom_models:build_not_scriptable"
    result = run_app(
        "train_model.py",
        *train_args(processed_sample, tmp_path, f"model={model}", "setup_mlflow=false"),
        cwd=tmp_path,
        env=WITH_MODELS,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert f"model '{model}' (NotScriptable) cannot be compiled to TorchScript" in output
    assert "variable number of arguments" in output  # TorchScript's own message
    assert "Traceback" not in output
    assert not (tmp_path / "models").exists()


def test_unusable_model_callables_are_clear_errors(tmp_path: Path, processed_sample: Path) -> None:
    cases = {
        "python:custom_models:build_not_a_module": "returned str, not a torch.nn.Module",
        "python:custom_models:missing": "module 'custom_models' has no 'missing'",
        "python:no_such_module:build": "cannot import module 'no_such_module'",
        "python:custom_models": "expected python:<module>:<callable>",
    }
    for model, message in cases.items():
        result = run_app(
            "train_model.py",
            *train_args(processed_sample, tmp_path, f"model={model}", "setup_mlflow=false"),
            cwd=tmp_path,
            env=WITH_MODELS,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert message in output and "Traceback" not in output, output


def test_one_step_of_a_python_model_gives_eager_pytorchs_loss_and_weights(tmp_path: Path, small_raw: Path) -> None:
    """kiln's C++ loop running the scripted module computes what the module computes in eager PyTorch:
    the same loss and, after one Adadelta step, the same weights and batch-norm statistics. The ResNet
    has no dropout, whose masks kiln and eager PyTorch would draw differently."""
    name = "python:custom_models:build_resnet"
    processed = tmp_path / "processed"
    kiln.prepare_dataset(small_raw, processed)
    images, labels = kiln.load_split(processed, "train")
    custom_model.register(name, processed, seed=1)
    # One batch holding the whole split: one step.
    trainer = kiln.Trainer(processed, model=name, train_batch_size=len(labels), precision="fp32", seed=1)
    metrics = trainer.run_epoch()
    trainer.save_checkpoint(tmp_path / "step.pt")
    saved = torch.load(tmp_path / "step.pt", weights_only=True)

    # The batch in the order of kiln's first epoch (torch.randperm from the seed), channels-last as kiln
    # trains: the same sums in the same order. (In another order, this model's gradients on these images
    # move by up to 1.4% of their largest element, measured between two orders in eager PyTorch alone:
    # the images' flat black backgrounds give equal activations near ReLU's and the residual sum's zero.)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(saved["normalization"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(saved["normalization"]["std"]).view(1, -1, 1, 1)
    x = ((images[order].float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
    eager = custom_model.build_module(name, len(trainer.classes), 1, seed=1).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adadelta(eager.train().parameters(), lr=1.3)
    loss = functional.cross_entropy(eager(x), labels[order])
    loss.backward()
    optimizer.step()

    assert metrics["train_loss"] == pytest.approx(loss.item(), rel=1e-6)
    expected_state = eager.state_dict()
    assert saved["model"]["state_dict"].keys() == expected_state.keys()
    for key, value in saved["model"]["state_dict"].items():
        # Tolerance: kiln normalises the pixels in one fused multiply-add, eager PyTorch in two steps,
        # so inputs differ in their last bit.
        torch.testing.assert_close(
            value, expected_state[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}"
        )
