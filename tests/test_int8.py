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


def run_with_isa_limit(isa: str, script: str) -> str:
    """The last line `script` prints, run where ONEDNN_MAX_CPU_ISA=`isa` (with ATEN_CPU_CAPABILITY=avx2):
    how a CPU without AVX-512 is emulated. kiln's own ISA checks honour the limit, as oneDNN does."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa, "ATEN_CPU_CAPABILITY": "avx2"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_auto_picks_int8_on_avx2_without_vnni_and_keeps_the_model_s_answers(
    trained_checkpoint: Path, processed_sample: Path
) -> None:
    int8_or_skip(trained_checkpoint)
    script = (
        "import kiln\n"
        "from kiln.inference import load_predictor\n"
        f"images, labels = kiln.load_split({str(processed_sample)!r}, 'test')\n"
        f"p = load_predictor({str(trained_checkpoint)!r}, no_cuda=True)\n"
        f"fp32 = kiln.Predictor({str(trained_checkpoint)!r}, precision='fp32').predict(images).argmax(1)\n"
        "print(p.precision, (p.predict(images).argmax(1) == fp32).float().mean().item())\n"
    )
    precision, agreement = run_with_isa_limit("AVX2", script).split()
    assert precision == "int8"
    assert float(agreement) >= 0.97


def test_below_avx2_auto_predicts_in_fp32_and_says_why(trained_checkpoint: Path) -> None:
    int8_or_skip(trained_checkpoint)
    script = (
        "from kiln.inference import load_predictor\n"
        f"p = load_predictor({str(trained_checkpoint)!r}, no_cuda=True)\n"
        "print(p.precision, '|', p.int8_unavailable)\n"
    )
    precision, reason = (part.strip() for part in run_with_isa_limit("AVX", script).split("|"))
    assert precision == "fp32"
    assert reason == "ONEDNN_MAX_CPU_ISA=AVX keeps oneDNN from AVX2 int8 instructions"


def test_int8_without_vnni_does_not_saturate_where_neighbouring_products_are_largest(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    """Without VNNI oneDNN adds pairs of uint8 x int8 products in a saturating int16 (vpmaddubsw): 255 x 127
    twice overflows it. The worst case on purpose: a bright image lights every conv1 channel at its
    calibrated maximum (uint8 255) and every conv2 weight is its channel's largest. kiln's narrower
    weights there keep int8's probabilities those of fp32 (full-range weights moved them by 0.26)."""
    int8_or_skip(trained_checkpoint)
    saved = torch.load(trained_checkpoint, weights_only=True)
    weights = saved["model"]["state_dict"]
    generator = torch.Generator().manual_seed(0)
    weights["conv1.weight"] = torch.full_like(weights["conv1.weight"], 0.1)
    weights["conv2.weight"] = torch.full_like(weights["conv2.weight"], 0.01)
    weights["fc1.weight"] = torch.randn(weights["fc1.weight"].shape, generator=generator) * 0.005
    weights["fc2.weight"] = torch.randn(weights["fc2.weight"].shape, generator=generator) * 0.2
    for name in ("conv1.bias", "conv2.bias", "fc1.bias", "fc2.bias"):
        weights[name] = torch.zeros_like(weights[name])
    images = torch.full((4, 1, 28, 28), 255, dtype=torch.uint8)
    images[2:] = 200
    # The calibration kiln's evaluation would record for these weights: each ReLU's largest output.
    mean = torch.tensor(saved["normalization"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(saved["normalization"]["std"]).view(1, -1, 1, 1)
    conv1 = torch.relu(torch.nn.functional.conv2d((images / 255 - mean) / std, weights["conv1.weight"]))
    pooled = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(conv1, weights["conv2.weight"])), 2)
    fc1 = torch.relu(pooled.flatten(1) @ weights["fc1.weight"].t())
    saved["int8_calibration"] = {"activation_max": [float(a.max()) for a in (conv1, pooled, fc1)], "images": 4}
    del saved["integrity"]  # the weights changed on purpose
    torch.save(saved, tmp_path / "worst-case.pt")
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import torch, kiln\n"
        f"images = torch.load({str(tmp_path / 'images.pt')!r})\n"
        f"fp32 = kiln.Predictor({str(tmp_path / 'worst-case.pt')!r}, precision='fp32').predict(images)\n"
        f"int8 = kiln.Predictor({str(tmp_path / 'worst-case.pt')!r}, precision='int8').predict(images)\n"
        "print(fp32.max().item(), (int8 - fp32).abs().max().item())\n"
    )
    largest, difference = (float(value) for value in run_with_isa_limit("AVX2", script).split())
    assert largest < 0.9  # probabilities that can show a difference
    assert difference < 0.05
