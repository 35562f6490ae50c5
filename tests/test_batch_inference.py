"""Batch inference: `kiln.inference.batch_infer(cfg, out)` on configs composed from
conf/batch_inferencing.yaml, the real `python src/batch_inferencing.py` for the command's contract
(exit codes, messages, an MLflow model from the environment), model resolution and download."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kiln
from conftest import REPO, SAMPLE, run_app
from kiln.cli import compose_config
from kiln.inference import batch_infer, load_predictor

TEST_CLASS = "7_Sneaker"


def sample_rows_of(processed: Path, split: str, class_name: str) -> tuple[list[Path], torch.Tensor]:
    """The sample's files of one class and their rows of the processed split, in the same order."""
    manifest = kiln.read_manifest(processed)
    counts = manifest.split(split).class_counts
    label = manifest.classes.index(class_name)
    first = sum(counts[name] for name in manifest.classes[:label])
    files = sorted((SAMPLE / split / class_name).iterdir())
    images, _ = kiln.load_split(processed, split)
    return files, images[first : first + len(files)]


def test_serving_sees_exactly_the_pixels_and_predictions_training_saw(
    processed_sample: Path, trained_checkpoint: Path
) -> None:
    files, rows = sample_rows_of(processed_sample, "test", TEST_CLASS)
    predictor = kiln.Predictor(trained_checkpoint)
    from_tensor = predictor.predict(rows)
    from_files, errors = predictor.predict_encoded([file.read_bytes() for file in files])
    assert errors == [None] * len(files)
    assert torch.equal(from_files, from_tensor)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_inference_classifies_every_image_and_reports_bad_files(
    tmp_path: Path, processed_sample: Path, trained_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files, rows = sample_rows_of(processed_sample, "test", TEST_CLASS)
    images = tmp_path / "images"
    images.mkdir()
    for file in files:
        shutil.copy(file, images / file.name)
    (images / "truncated.png").write_bytes(files[0].read_bytes()[:100])
    (images / "notes.png").write_text("not an image")
    (images / "readme.txt").write_text("not matched by the glob")

    config = compose_config(
        "batch_inferencing",
        [f"inference.model_path={trained_checkpoint}", f"inference.input_data_dir={images}", "inference.batch_size=16"],
    )
    with caplog.at_level(logging.INFO, logger="kiln.inference"):
        summary = batch_infer(config, tmp_path / "outputs")
    output = tmp_path / "outputs" / "batch-infer-res.jsonl"
    assert summary == {"files": len(files) + 2, "classified": len(files), "failed": 2, "output_path": str(output)}
    assert f"Batch inference results are saved to {output}" in caplog.text
    lines = read_lines(output)
    assert len(lines) == len(files) + 2
    by_name = {Path(line["filepath"]).name: line for line in lines}
    assert set(by_name) == {file.name for file in files} | {"truncated.png", "notes.png"}
    for name in ("truncated.png", "notes.png"):
        assert by_name[name]["prediction"] is None and by_name[name]["error"]

    predictor = load_predictor(trained_checkpoint, no_cuda=True)  # as the app
    probabilities = predictor.predict(rows)
    for file, row in zip(files, probabilities, strict=True):
        line = by_name[file.name]
        # The template guide's field, "filepath", then kiln's earlier name for it, which keeps its readers working.
        assert list(line) == ["time", "filepath", "image_filepath", "prediction", "probability"]
        assert Path(line["filepath"]) == (images / file.name).resolve()
        assert line["image_filepath"] == line["filepath"]
        assert line["prediction"] == predictor.classes[int(row.argmax())]
        # Equal up to rounding: oneDNN sums in another order for another batch size.
        assert line["probability"] == pytest.approx(float(row.max()), abs=2e-3)
        assert line["time"].endswith("+0000") and len(line["time"]) == 24


def test_no_matching_file_is_a_clear_error_and_writes_nothing(tmp_path: Path, trained_checkpoint: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"")
    result = run_app(
        "batch_inferencing.py",
        f"inference.model_path={trained_checkpoint}",
        f"inference.input_data_dir={images}",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    log = result.stdout + result.stderr
    assert "*.png" in log and str(images) in log
    assert "Traceback" not in log
    assert not (tmp_path / "outputs" / "batch-infer-res.jsonl").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["inference.input_data_dir=."], "inference.model_path"),
        (["inference.model_path=/nowhere/model.pt", "inference.input_data_dir=."], "/nowhere/model.pt"),
    ],
)
def test_missing_model_is_a_clear_error(tmp_path: Path, overrides: list[str], message: str) -> None:
    result = run_app("batch_inferencing.py", *overrides, cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_corrupt_checkpoint_is_refused_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    result = run_app(
        "batch_inferencing.py", f"inference.model_path={bad}", f"inference.input_data_dir={tmp_path}", cwd=tmp_path
    )
    assert result.returncode == 1
    assert str(bad) in result.stdout + result.stderr


def test_batch_inference_from_an_mlflow_run_uri(tmp_path: Path, mlflow_server: str, tracked_run: str) -> None:
    images = tmp_path / "images" / "nested"
    images.mkdir(parents=True)
    for file in sorted((SAMPLE / "test" / TEST_CLASS).iterdir())[:5]:
        shutil.copy(file, images / file.name)
    result = run_app(
        "batch_inferencing.py",
        f"inference.model_path=runs:/{tracked_run}/model",
        f"inference.input_data_dir={tmp_path / 'images'}",
        "inference.file_check_glob=**/*.png",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": mlflow_server},
    )
    assert result.returncode == 0, result.stderr
    lines = read_lines(tmp_path / "outputs" / "batch-infer-res.jsonl")
    assert len(lines) == 5 and all(line["prediction"] for line in lines)


def test_download_cli_fetches_a_run_for_serving(tmp_path: Path, mlflow_server: str, tracked_run: str) -> None:
    command = [sys.executable, "-m", "kiln.models", "download", tracked_run, "--dst", str(tmp_path / "models")]
    result = subprocess.run(command + ["--tracking-uri", mlflow_server], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    checkpoint = Path(result.stdout.strip())
    assert checkpoint == tmp_path / "models" / tracked_run / "checkpoint" / "checkpoint.pt"
    assert kiln.Predictor(checkpoint).epoch == 1
    assert (tmp_path / "models" / tracked_run / "train_model_config.json").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [tracked_run]  # no staging dir left

    unknown = subprocess.run(
        command[:4] + ["0" * 32, "--dst", str(tmp_path / "models"), "--tracking-uri", mlflow_server],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert unknown.returncode == 1
    assert "0" * 32 in unknown.stderr and "Traceback" not in unknown.stderr
    assert [p.name for p in (tmp_path / "models").iterdir()] == [tracked_run]
