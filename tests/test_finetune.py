"""Fine-tuning end to end: the sample as 64 px RGB, resnet18 from a pretrained file, frozen backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kiln
from conftest import copy_sample, run_app
from kiln.pretrained import IMAGENET_MEAN, IMAGENET_STD
from torchvision_shim import import_torchvision

torchvision = import_torchvision()
pytestmark = pytest.mark.skipif(torchvision is None, reason="needs torchvision (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def rgb64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample's 10 classes (40 images each per split), upscaled to 64x64 and made RGB by process_data.py."""
    root = tmp_path_factory.mktemp("rgb64")
    raw = copy_sample(root / "raw", per_class=40)
    processed = root / "processed"
    result = run_app(
        "process_data.py",
        f"raw_data_dir_path={raw}",
        f"processed_data_dir_path={processed}",
        "image_size=[64,64]",
        "channels=3",
        cwd=root,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return processed


def test_resnet18_fine_tunes_from_a_pretrained_file_with_a_frozen_backbone(
    tmp_path: Path, rgb64: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this test reads the run's file store

    # "Pretrained" weights made here, offline: torchvision's resnet18 (1000 classes), random init.
    torch.manual_seed(0)
    source = torchvision.models.resnet18()
    weights = tmp_path / "resnet18-local.pth"
    torch.save(source.state_dict(), weights)
    tracking_uri = (tmp_path / "mlruns").as_uri()

    result = run_app(
        "train_model.py",
        f"data_dir_path={rgb64}",
        "model=resnet18",
        f"pretrained={weights}",
        "freeze=backbone",
        "optimizer=sgd",
        "lr=0.05",
        "momentum=0.9",
        "nesterov=true",
        "weight_decay=0.0001",
        "gamma=1.0",
        "train_bs=16",
        "epochs=3",
        f"mlflow_tracking_uri={tracking_uri}",
        f"artifact_dir_path={tmp_path / 'models'}",
        cwd=tmp_path,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "the classifier head ('fc.weight', 'fc.bias') is new: the weights have 1000 classes, the data 10" in output

    checkpoint_path = next((tmp_path / "models").glob("*/checkpoint.pt"))
    saved = torch.load(checkpoint_path, weights_only=True)
    accuracies = [epoch["test_accuracy"] for epoch in saved["history"]]
    assert accuracies[-1] > accuracies[0], accuracies
    assert accuracies[-1] > 0.3, accuracies  # 10 classes: chance is 0.1

    # The backbone stayed the file's; the head trained.
    state = saved["model"]["state_dict"]
    assert torch.equal(state["layer4.1.conv2.weight"], source.state_dict()["layer4.1.conv2.weight"])
    assert state["fc.weight"].shape == (10, 512)
    # The weights' normalisation is the checkpoint's, so inference preprocesses as training did.
    assert saved["normalization"]["mean"] == pytest.approx(IMAGENET_MEAN)
    assert saved["normalization"]["std"] == pytest.approx(IMAGENET_STD)
    images, labels = kiln.load_split(rgb64, "test")
    predicted = kiln.Predictor(checkpoint_path).predict(images).argmax(1)
    # Training evaluates in its precision (bf16 where the CPU has it), the predictor in fp32: a few
    # borderline images may differ, a wrong normalisation would not be this close.
    assert (predicted == labels).float().mean().item() == pytest.approx(accuracies[-1], abs=0.01)

    # Batch inference classifies the raw test photos (28 px grayscale, brought to 64 px RGB as process_data
    # brought them) with the resnet18 checkpoint, as accurately as the evaluation did.
    raw_test = rgb64.parent / "raw" / "test"
    result = run_app(
        "batch_inferencing.py",
        f"inference.model_path={checkpoint_path}",
        f"inference.input_data_dir={raw_test}",
        "inference.file_check_glob=**/*.png",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in (tmp_path / "outputs" / "batch-infer-res.jsonl").read_text().splitlines()]
    assert len(lines) == len(labels)
    right = [Path(line["image_filepath"]).parent.name == line["prediction"] for line in lines]
    assert sum(right) / len(right) == pytest.approx(accuracies[-1], abs=0.02)

    mlflow.set_tracking_uri(tracking_uri)
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.data.params["model"] == "resnet18"
    assert run.data.params["pretrained"] == str(weights)
    assert run.data.params["optimizer"] == "sgd"
    assert run.data.params["freeze"] == "backbone"


def test_a_weights_name_neither_cached_nor_downloadable_fails_naming_the_file_and_where(
    tmp_path: Path, rgb64: Path
) -> None:
    torch_home = tmp_path / "torch-home"
    result = run_app(
        "train_model.py",
        f"data_dir_path={rgb64}",
        "model=resnet18",
        "pretrained=ResNet18_Weights.IMAGENET1K_V1",
        "setup_mlflow=false",
        cwd=tmp_path,
        # Offline: every download goes to a proxy on a closed port.
        env={"TORCH_HOME": str(torch_home), "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "resnet18-f37072fd.pth is not in torchvision's cache" in output
    assert str(torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in output
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in output
    assert "Traceback" not in output


def test_a_missing_pretrained_file_fails_before_training(tmp_path: Path, rgb64: Path) -> None:
    result = run_app(
        "train_model.py",
        f"data_dir_path={rgb64}",
        "model=resnet18",
        f"pretrained={tmp_path / 'nowhere.pth'}",
        "setup_mlflow=false",
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"pretrained={tmp_path / 'nowhere.pth'}: no such file" in output
    assert not (tmp_path / "models").exists()


def test_unknown_optimizer_and_freeze_values_are_refused_by_name(tmp_path: Path, rgb64: Path) -> None:
    for override, expected in (
        ("optimizer=adam", "unknown optimizer 'adam' (known: adadelta, sgd, adamw)"),
        ("freeze=everything", "unknown freeze 'everything' (expected none or backbone)"),
    ):
        result = run_app(
            "train_model.py", f"data_dir_path={rgb64}", "model=resnet18", override, "setup_mlflow=false", cwd=tmp_path
        )
        assert result.returncode == 1, result.stdout + result.stderr
        assert expected in result.stdout + result.stderr
