"""Benchmark: training images/s of torchvision architectures, kiln's C++ loop vs the best plain PyTorch loop.

    python bench/models.py                         # resnet18 and mobilenet_v3_small, 64x64 RGB, batch 32
    python bench/models.py --models resnet18 --steps 40 --rounds 3

The data: the embedded sample (data/sample) brought to 64x64 RGB by kiln.prepare_dataset. Both sides
train the same architecture from the same weights with the same optimizer (Adadelta, lr 1.3: the
template's) and batch size, in the same precision (kiln's precision=auto: bf16 autocast where the CPU
computes it natively, else fp32):
  kiln     kiln.Trainer (what `python src/train_model.py model=<name>` runs); images/s of its training
           batches as it reports them (on_steps), after a warm-up window
  pytorch  torchvision.models.<name> in the best plain loop: uint8 tensors in memory, randperm batches,
           normalised per batch, channels-last model and input, bf16 autocast where the CPU has it,
           torch.optim.Adadelta (foreach); timed over the same number of steps after warm-up
torchvision is imported through tests/torchvision_shim.py (PyPI's wheel beside the CPU torch).
Prints images/s for each and kiln's ratio, per round and the median over rounds (the shared
machine's speed drifts, so compare within rounds), and the CPU's ISA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from isa import add_isa_argument, apply_isa, cpu_isa  # noqa: E402

LR, BATCH, SIZE = 1.3, 32, 64


def kiln_images_per_second(processed: Path, name: str, steps: int, precision: str) -> float:
    import kiln

    trainer = kiln.Trainer(
        processed,
        model=name,
        lr=LR,
        train_batch_size=BATCH,
        precision=precision,
        train_limit=(steps + 10) * BATCH,
        test_limit=BATCH,
    )
    reports: list[float] = []

    # The first window (10 batches) warms up; the later ones cover `steps` batches.
    def on_steps(metrics: dict) -> None:
        reports.append(metrics["images_per_second"])

    trainer.run_epoch(on_steps=on_steps, every_n_steps=10)  # one epoch: warm-up window + measured ones
    return statistics.median(reports[1:]) if len(reports) > 1 else reports[0]


def pytorch_images_per_second(processed: Path, name: str, steps: int, precision: str) -> float:
    import torch
    from torch.nn import functional

    import kiln
    from torchvision_shim import import_torchvision

    torchvision = import_torchvision()
    images, labels = kiln.load_split(processed, "train")
    manifest = kiln.read_manifest(processed)
    mean = torch.tensor(manifest.mean).view(1, -1, 1, 1)
    std = torch.tensor(manifest.std).view(1, -1, 1, 1)
    model = getattr(torchvision.models, name)(num_classes=len(manifest.classes))
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=LR)
    bf16 = precision == "bf16"
    generator = torch.Generator().manual_seed(1)

    def step(indices: torch.Tensor) -> None:
        x = ((images[indices].float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = functional.cross_entropy(model(x), labels[indices])
        loss.backward()
        optimizer.step()

    order = torch.randperm(len(labels), generator=generator)
    batches = [order[i : i + BATCH] for i in range(0, len(order) - BATCH + 1, BATCH)]
    for indices in batches[:10]:  # warm-up, as kiln's first window
        step(indices)
    measured = [batches[(10 + i) % len(batches)] for i in range(steps)]
    started = time.perf_counter()
    for indices in measured:
        step(indices)
    return steps * BATCH / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    parser.add_argument("--steps", type=int, default=30, help="measured training batches per contender and round")
    parser.add_argument("--rounds", type=int, default=2)
    add_isa_argument(parser)
    args = parser.parse_args()
    apply_isa(args.isa)

    import kiln
    from kiln.precision import resolve_precision

    precision = resolve_precision("auto", "cpu")
    print(f"CPU: {cpu_isa()}; precision {precision}; {SIZE}x{SIZE} RGB, batch {BATCH}, Adadelta")
    with tempfile.TemporaryDirectory() as scratch:
        processed = Path(scratch) / "processed"
        kiln.prepare_dataset(REPO / "data" / "sample", processed, image_size=(SIZE, SIZE), channels=3)
        for name in args.models:
            ratios = []
            for round_ in range(args.rounds):
                ours = kiln_images_per_second(processed, name, args.steps, precision)
                theirs = pytorch_images_per_second(processed, name, args.steps, precision)
                ratios.append(ours / theirs)
                figures = f"kiln {ours:.1f} img/s, pytorch {theirs:.1f} img/s, {ours / theirs:.2f}x"
                print(f"{name} round {round_ + 1}: {figures}")
            print(f"{name}: kiln / pytorch = {statistics.median(ratios):.2f}x (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
