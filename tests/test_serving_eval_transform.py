"""A checkpoint's evaluation transform on every inference path: kiln.Predictor, batch_inferencing.py, the
gunicorn server (files and UINT8 tensors) and the MLflow pyfunc model give the answers of the model on the
processed images through the transform, which is what training evaluated."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import kiln
from conftest import SAMPLE, copy_sample, run_app
from kiln._core import EvalTransformOptions
from kiln.inference import load_predictor
from test_serving import ModelServer, call


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The sample at 32x32 (two images per class and split) and its test files in the test split's row order."""
    root = tmp_path_factory.mktemp("processed-32")
    raw = copy_sample(root / "raw", per_class=2)
    kiln.prepare_dataset(raw, root / "processed", image_size=(32, 32))
    return root / "processed", [
        file for folder in sorted((raw / "test").iterdir()) for file in sorted(folder.iterdir())
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, processed: tuple[Path, list[Path]]) -> tuple[Path, float]:
    """A model trained on the 32x32 images through transforms.eval Resize(30) (the shorter edge) and
    CenterCrop(28): its checkpoint and the test accuracy training's evaluation measured."""
    data, _ = processed
    transform = EvalTransformOptions(resize=(30, 0), center_crop=(28, 28))
    trainer = kiln.Trainer(data, seed=3, eval_transform=transform)
    metrics = trainer.run_epoch()
    checkpoint = tmp_path_factory.mktemp("transformed") / "checkpoint.pt"
    trainer.save_checkpoint(checkpoint)
    return checkpoint, metrics["test_accuracy"]


@pytest.fixture(scope="module")
def transformed_checkpoint(trained: tuple[Path, float]) -> Path:
    return trained[0]


@pytest.fixture(scope="module")
def processed_files(processed: tuple[Path, list[Path]]) -> tuple[list[Path], torch.Tensor]:
    """The test files and their rows of the 32x32 processed test split, in the same order."""
    data, files = processed
    images, _ = kiln.load_split(data, "test")
    assert images.shape == (len(files), 1, 32, 32)
    return files, images


def test_the_predictor_applies_the_transform_training_evaluated_with(
    tmp_path: Path, trained: tuple[Path, float], processed: tuple[Path, list[Path]]
) -> None:
    checkpoint, test_accuracy = trained
    data, files = processed
    predictor = kiln.Predictor(checkpoint)
    assert predictor.image_shape == (1, 32, 32)
    assert predictor.input_shape == (1, 28, 28)
    assert predictor.eval_transform == {"resize": [30], "center_crop": [28, 28]}
    rows, labels = kiln.load_split(data, "test")
    probabilities = predictor.predict(rows)
    # The pixels training evaluated: the same accuracy as its last evaluation.
    assert (probabilities.argmax(1) == labels).double().mean().item() == pytest.approx(test_accuracy, abs=1e-12)

    encoded = [file.read_bytes() for file in files]
    from_files, errors = predictor.predict_encoded(encoded)
    assert errors == [None] * len(files)
    assert torch.equal(from_files, probabilities)
    seen, errors = predictor.preprocess(encoded)
    assert seen.shape == (len(files), 1, 28, 28) and errors == [None] * len(files)
    # The same weights without a transform, given the preprocessed pixels: the same answers.
    untransformed = torch.load(checkpoint, weights_only=True)
    untransformed["transform"] = {"image_shape": [1, 28, 28], "resize": None, "center_crop": None}
    untransformed["format_version"] = 1
    torch.save(untransformed, tmp_path / "untransformed.pt")
    assert torch.equal(kiln.Predictor(tmp_path / "untransformed.pt").predict(seen), probabilities)
    with pytest.raises(ValueError, match=r"\[N, 1, 32, 32\] \(the processed images the model was trained on"):
        predictor.predict(seen)


def test_batch_inferencing_applies_the_transform(
    tmp_path: Path, transformed_checkpoint: Path, processed_files: tuple[list[Path], torch.Tensor]
) -> None:
    files, rows = processed_files
    images = tmp_path / "images"
    images.mkdir()
    for index, file in enumerate(files):
        shutil.copy(file, images / f"{index:03d}.png")
    result = run_app(
        "batch_inferencing.py",
        f"inference.model_path={transformed_checkpoint}",
        f"inference.input_data_dir={images}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "images 1x32x32, then resize 30, then center_crop 28x28" in result.stdout + result.stderr
    lines = [json.loads(line) for line in (tmp_path / "outputs" / "batch-infer-res.jsonl").read_text().splitlines()]
    predictor = load_predictor(transformed_checkpoint, no_cuda=True)  # the app's precision
    probabilities = predictor.predict(rows)
    assert [Path(line["filepath"]).name for line in lines] == [f"{index:03d}.png" for index in range(len(files))]
    for line, row in zip(lines, probabilities, strict=True):
        assert line["prediction"] == predictor.classes[int(row.argmax())]
        # Equal up to rounding: oneDNN sums in another order for another batch size.
        assert line["probability"] == pytest.approx(float(row.max()), abs=2e-3)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, transformed_checkpoint: Path):
    running = ModelServer(tmp_path_factory.mktemp("transform-server"), {"PRED_MODEL_PATH": str(transformed_checkpoint)})
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_the_server_applies_the_transform_to_files_and_uint8_tensors(
    server: ModelServer, transformed_checkpoint: Path, processed_files: tuple[list[Path], torch.Tensor]
) -> None:
    files, rows = processed_files
    files, rows = files[:6], rows[:6]
    probabilities = load_predictor(transformed_checkpoint, no_cuda=True).predict(rows)  # the server's precision

    body = {
        "images": [{"id": index, "image": base64.b64encode(f.read_bytes()).decode()} for index, f in enumerate(files)]
    }
    status, answer = call(f"{server.url}/api/v1/model/predict", json.dumps(body).encode())
    assert status == 200, answer
    served = torch.tensor([list(item["probabilities"].values()) for item in answer["data"]])
    assert torch.allclose(served, probabilities, atol=2e-3)

    # UINT8 tensors are the processed images (the metadata's shape), transformed by the server as files are.
    status, metadata = call(f"{server.url}/v2/models/kiln")
    assert {"name": "images", "datatype": "UINT8", "shape": [-1, 1, 32, 32]} in metadata["inputs"]
    request = {
        "inputs": [{"name": "images", "shape": list(rows.shape), "datatype": "UINT8", "data": rows.flatten().tolist()}]
    }
    status, answer = call(f"{server.url}/v2/models/kiln/infer", json.dumps(request).encode())
    assert status == 200, answer
    outputs = {output["name"]: output for output in answer["outputs"]}
    assert torch.allclose(torch.tensor(outputs["probabilities"]["data"]).view(6, -1), probabilities, atol=2e-3)

    status, version = call(f"{server.url}/api/v1/model/version")
    assert status == 200
    assert version["data"]["image_shape"] == [1, 32, 32]
    assert version["data"]["eval_transform"] == {"resize": [30], "center_crop": [28, 28]}


def test_the_pyfunc_model_applies_the_transform(
    transformed_checkpoint: Path, processed_files: tuple[list[Path], torch.Tensor]
) -> None:
    from mlflow.pyfunc import PythonModelContext

    from kiln.mlflow_model import KilnImageClassifier

    _, rows = processed_files
    model = KilnImageClassifier()
    model.load_context(PythonModelContext(artifacts={"checkpoint": str(transformed_checkpoint)}, model_config={}))
    answer = model.predict(None, rows.numpy())
    expected = load_predictor(transformed_checkpoint, no_cuda=True, precision="auto").predict(rows).numpy()
    assert np.array_equal(np.stack(answer["probabilities"].to_list()), expected)
    with pytest.raises(ValueError, match=r"\[N, 1, 32, 32\]"):
        model.predict(None, np.zeros((1, 1, 28, 28), dtype=np.uint8))


def test_a_checkpoint_without_a_transform_is_served_as_before(trained_checkpoint: Path) -> None:
    predictor = kiln.Predictor(trained_checkpoint)
    assert predictor.image_shape == predictor.input_shape == (1, 28, 28)
    assert predictor.eval_transform == {"resize": None, "center_crop": None}
    file = sorted((SAMPLE / "test" / "7_Sneaker").iterdir())[0]
    seen, _ = predictor.preprocess([file.read_bytes()])
    assert torch.equal(predictor.predict(seen), predictor.predict_encoded([file.read_bytes()])[0])
