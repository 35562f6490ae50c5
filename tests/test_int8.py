"""int8 inference: calibration recorded by training, predictions that keep the model's answers, and
the precision rules (auto, explicit int8, checkpoints that cannot run in int8)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kiln
from conftest import SAMPLE, run_app
from kiln.inference import load_predictor


def int8_or_skip(checkpoint: Path) -> kiln.Predictor:
    predictor = kiln.Predictor(checkpoint, precision="int8", fallback="fp32")
    if predictor.int8_unavailable:
        pytest.skip(f"int8 cannot run here: {predictor.int8_unavailable}")
    return predictor


def without_calibration(checkpoint: Path, destination: Path) -> Path:
    """The checkpoint as kiln wrote it before it recorded int8 calibration."""
    saved = torch.load(checkpoint, weights_only=True)
    del saved["int8_calibration"]
    torch.save(saved, destination)
    return destination


def test_training_records_the_calibration_in_the_checkpoint(trained_checkpoint: Path) -> None:
    saved = torch.load(trained_checkpoint, weights_only=True)
    calibration = saved["int8_calibration"]
    assert calibration["images"] == 200  # the fixture's test_limit: the whole evaluation
    assert len(calibration["activation_max"]) == 3
    assert all(value > 0 for value in calibration["activation_max"])


def test_int8_keeps_the_model_s_answers(trained_checkpoint: Path, processed_sample: Path) -> None:
    images, labels = kiln.load_split(processed_sample, "test")
    fp32 = kiln.Predictor(trained_checkpoint).predict(images)
    int8 = int8_or_skip(trained_checkpoint).predict(images)
    assert int8.shape == fp32.shape
    assert torch.allclose(int8.sum(1), torch.ones(len(int8)), atol=1e-5)
    agreement = (int8.argmax(1) == fp32.argmax(1)).float().mean().item()
    assert agreement >= 0.97, agreement
    assert (int8 - fp32).abs().max().item() < 0.1
    accuracy = {name: (p.argmax(1) == labels).float().mean().item() for name, p in (("fp32", fp32), ("int8", int8))}
    assert abs(accuracy["int8"] - accuracy["fp32"]) <= 0.02, accuracy


def test_auto_picks_int8_and_falls_back_saying_why(trained_checkpoint: Path, tmp_path: Path) -> None:
    int8_or_skip(trained_checkpoint)
    assert load_predictor(trained_checkpoint, no_cuda=True).precision == "int8"
    assert load_predictor(trained_checkpoint, no_cuda=True, precision="fp32").precision == "fp32"

    old = without_calibration(trained_checkpoint, tmp_path / "old.pt")
    predictor = load_predictor(old, no_cuda=True)
    assert predictor.precision in ("bf16", "fp32")
    assert "no int8 calibration" in predictor.int8_unavailable
    with pytest.raises(ValueError, match="no int8 calibration"):
        load_predictor(old, no_cuda=True, precision="int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        load_predictor(old, no_cuda=True, precision="int4")


def test_models_without_an_int8_path_say_so(processed_sample: Path, tmp_path: Path) -> None:
    trainer = kiln.Trainer(processed_sample, model="resnet8", train_limit=64, test_limit=32)
    trainer.run_epoch()
    trainer.save_checkpoint(tmp_path / "resnet.pt")
    assert "int8_calibration" not in torch.load(tmp_path / "resnet.pt", weights_only=True)
    predictor = load_predictor(tmp_path / "resnet.pt", no_cuda=True)
    assert predictor.precision in ("bf16", "fp32")
    assert "covers mnist_cnn, not resnet8" in predictor.int8_unavailable


def test_batch_inferencing_with_int8_forced_on_an_old_checkpoint_exits_naming_why(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    old = without_calibration(trained_checkpoint, tmp_path / "old.pt")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(next(SAMPLE.glob("**/*.png")).read_bytes())
    result = run_app(
        "batch_inferencing.py",
        f"inference.model_path={old}",
        f"inference.input_data_dir={images}",
        "inference.precision=int8",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "no int8 calibration" in result.stderr + result.stdout
    assert not (tmp_path / "outputs" / "batch-infer-res.jsonl").exists()


def test_an_avx2_isa_limit_makes_auto_behave_as_on_a_cpu_without_vnni(trained_checkpoint: Path) -> None:
    """ONEDNN_MAX_CPU_ISA=AVX2 (with ATEN_CPU_CAPABILITY=avx2) is how an AVX2-only CPU is emulated: kiln's
    own VNNI check honours it, so auto picks what such a CPU gets (fp32: no native bf16 either) and says why."""
    int8_or_skip(trained_checkpoint)
    script = (
        "import logging, kiln\n"
        "from kiln.inference import load_predictor\n"
        f"p = load_predictor({str(trained_checkpoint)!r}, no_cuda=True)\n"
        "print(p.precision, '|', p.int8_unavailable)\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    precision, reason = (part.strip() for part in result.stdout.strip().splitlines()[-1].split("|"))
    assert precision == "fp32"
    assert reason == "ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN from VNNI int8 instructions"
