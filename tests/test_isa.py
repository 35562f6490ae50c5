"""kiln's own vector loops on every CPU class this machine can emulate: the AVX-512, AVX2 and baseline copies
(kiln/detail/isa_dispatch.hpp), picked from ATEN_CPU_CAPABILITY as ATen picks its kernels, give the same
augmented pixels, normalised batches and training results. Each class runs in its own process (the copy is
picked once, when the library loads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# What one process computes with the copy it picked: augmentation (flip, colour jitter, erasing), the
# loader's normalisation, and a short fp32 training run per optimizer (conv1's small convolution, conv2's
# Winograd transforms, ReLU + pooling, the fused optimizer steps).
SCRIPT = r"""
import json, sys, torch, kiln
from kiln import transforms
from kiln.loader import DataLoader
processed, out = sys.argv[1], sys.argv[2]
config = {"train": {"random_resized_crop": {"size": [40, 36], "scale": [0.3, 1.0]}, "horizontal_flip": 0.5,
                    "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4},
                    "random_erasing": {"p": 0.5, "value": 128}}}
transform = transforms.from_config(config, 3)
image = torch.randint(0, 256, (3, 61, 47), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
augmented = torch.stack([transform.apply(image, seed=2, epoch=1, position=p) for p in range(24)])
batches = [b.clone() for b, _ in DataLoader(processed, split="test", batch_size=16, shuffle=False, augment=False,
                                             normalize=True, channels_last=True)]
metrics = {}
for optimizer in ("adadelta", "sgd", "adamw"):
    trainer = kiln.Trainer(processed, optimizer=optimizer, lr=0.05 if optimizer != "adadelta" else 1.0,
                           precision="fp32", train_limit=160, test_limit=96, seed=3)
    metrics[optimizer] = trainer.run_epoch()
torch.save({"isa": kiln._core.isa_level(), "augmented": augmented, "batches": torch.cat(batches)}, out)
print(json.dumps({k: {"train_loss": m["train_loss"], "test_loss": m["test_loss"]} for k, m in metrics.items()}))
"""


def cpu_classes() -> list[str]:
    """ATEN_CPU_CAPABILITY values this CPU can run: default always, avx2 and avx512 where it has them."""
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    classes = ["default"]
    if " avx2" in flags and " fma" in flags:
        classes.append("avx2")
    if all(f" {flag}" in flags for flag in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd")):
        classes.append("avx512")
    return classes


def run_class(capability: str, processed: Path, out: Path) -> dict:
    # One thread: mnist_cnn's conv2 then takes kiln's Winograd form (its transforms have a copy per class too).
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(processed), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from /proc/cpuinfo")
def test_every_copy_of_kilns_loops_computes_the_same(processed_sample: Path, tmp_path: Path) -> None:
    classes = cpu_classes()
    if len(classes) < 2:
        pytest.skip("this CPU runs only kiln's baseline loops")
    results = {
        c: (run_class(c, processed_sample, tmp_path / f"{c}.pt"), torch.load(tmp_path / f"{c}.pt")) for c in classes
    }
    names = {"default": "baseline", "avx2": "avx2", "avx512": "avx512"}
    for capability, (_, saved) in results.items():
        assert saved["isa"] == names[capability]  # the copy ATEN_CPU_CAPABILITY asked for ran
    reference_metrics, reference = results["default"]
    for capability, (metrics, saved) in results.items():
        # Integer pixel arithmetic (with exact fused multiply-adds): the same pixels.
        assert torch.equal(saved["augmented"], reference["augmented"]), capability
        # a * pixel + b, fused into one rounding where the CPU has FMA: within an ulp or two.
        assert torch.allclose(saved["batches"], reference["batches"], rtol=1e-6, atol=1e-6), capability
        # ATen's and oneDNN's kernels change with the class too: the same training within float rounding.
        for optimizer, figures in metrics.items():
            for key, value in figures.items():
                assert value == pytest.approx(reference_metrics[optimizer][key], rel=1e-3), (capability, optimizer, key)
