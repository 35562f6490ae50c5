"""Benchmark: training images/s of torchvision architectures, kiln's C++ loop vs the best plain PyTorch loop.

    python bench/models.py                         # resnet18 and mobilenet_v3_small, 64x64 RGB, batch 32
    python bench/models.py --models resnet18 --steps 40 --rounds 3

The data: the embedded sample (data/sample) brought to 64x64 RGB by kiln.prepare_dataset. Both sides
train the same architecture from the same weights with the same optimizer (Adadelta, lr 1.3: the
template's) and batch size, in the same precision (--precision; by default kiln's precision=auto: bf16
autocast where the CPU computes it natively, else fp32):
  kiln     kiln.Trainer (what `python src/train_model.py model=<name>` runs); images/s of its training
           batches as it reports them (on_steps), an epoch of 5 batches at a time
  pytorch  torchvision.models.<name> in the best plain loop: uint8 tensors in memory, randperm batches,
           normalised per batch, channels-last model and input, bf16 autocast where the CPU has it,
           torch.optim.Adadelta (foreach); timed 5 batches at a time
The two take turns every 5 batches (after a warm-up of 5 each), so a load that comes and goes on the
shared machine falls on both alike. torchvision is imported through tests/torchvision_shim.py (PyPI's
wheel beside the CPU torch). Prints images/s for each (the median of its 5-batch chunks) and kiln's
ratio, per round and the median over rounds, and the CPU's ISA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from isa import add_isa_argument, apply_isa, cpu_isa  # noqa: E402

LR, BATCH, SIZE, CHUNK = 1.3, 32, 64, 5


class KilnSide:
    """kiln.Trainer (what `python src/train_model.py model=<name>` runs): one epoch of `chunk` batches per
    measurement, timed by the trainer's own step report (on_steps), its evaluation not counted."""

    def __init__(self, processed: Path, name: str, chunk: int, precision: str) -> None:
        import kiln

        self.chunk = chunk
        self.trainer = kiln.Trainer(
            processed,
            model=name,
            lr=LR,
            train_batch_size=BATCH,
            precision=precision,
            train_limit=chunk * BATCH,
            test_limit=BATCH,
        )

    def images_per_second(self) -> float:
        reports: list[float] = []
        self.trainer.run_epoch(on_steps=lambda m: reports.append(m["images_per_second"]), every_n_steps=self.chunk)
        return reports[-1]


class PytorchSide:
    """The model in the best plain loop, `chunk` batches per measurement: torchvision's `name`, or what
    `build(classes, channels)` returns (bench/custom_model.py: the user's own module)."""

    def __init__(
        self, processed: Path, name: str, chunk: int, precision: str, build: Callable[[int, int], Any] | None = None
    ) -> None:
        import torch
        from torch.nn import functional

        import kiln

        images, labels = kiln.load_split(processed, "train")
        manifest = kiln.read_manifest(processed)
        mean = torch.tensor(manifest.mean).view(1, -1, 1, 1)
        std = torch.tensor(manifest.std).view(1, -1, 1, 1)
        if build is None:
            from torchvision_shim import import_torchvision

            model = getattr(import_torchvision().models, name)(num_classes=len(manifest.classes))
        else:
            model = build(len(manifest.classes), manifest.image.channels)
        model = model.to(memory_format=torch.channels_last).train()
        optimizer = torch.optim.Adadelta(model.parameters(), lr=LR)
        bf16 = precision == "bf16"

        def step(indices: torch.Tensor) -> None:
            x = ((images[indices].float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = functional.cross_entropy(model(x), labels[indices])
            loss.backward()
            optimizer.step()

        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
        self.batches = [order[i : i + BATCH] for i in range(0, len(order) - BATCH + 1, BATCH)]
        self.step, self.chunk, self.position = step, chunk, 0

    def images_per_second(self) -> float:
        started = time.perf_counter()
        for _ in range(self.chunk):
            self.step(self.batches[self.position % len(self.batches)])
            self.position += 1
        return self.chunk * BATCH / (time.perf_counter() - started)


def measure_round(
    processed: Path, name: str, steps: int, precision: str, build: Callable[[int, int], Any] | None = None
) -> tuple[float, float]:
    """Median images/s of kiln and of the plain loop (PytorchSide's model) over `steps` batches each, in
    chunks of CHUNK batches taken in turns (ABBA...), after one warm-up chunk each: a load that comes and
    goes on the shared machine then falls on both sides alike."""
    sides = [KilnSide(processed, name, CHUNK, precision), PytorchSide(processed, name, CHUNK, precision, build)]
    for side in sides:
        side.images_per_second()  # warm-up
    figures: list[list[float]] = [[], []]
    for turn in range(max(1, steps // CHUNK)):
        for index in (0, 1) if turn % 2 == 0 else (1, 0):
            figures[index].append(sides[index].images_per_second())
    return statistics.median(figures[0]), statistics.median(figures[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    parser.add_argument("--steps", type=int, default=30, help="measured training batches per contender and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="both sides' precision; auto: kiln's choice for this CPU (it times bf16 against fp32, so on a busy "
        "machine it may pick fp32 where a quiet one picks bf16)",
    )
    add_isa_argument(parser)
    args = parser.parse_args()
    apply_isa(args.isa)

    import kiln
    from kiln.precision import resolve_precision

    precision = resolve_precision(args.precision, "cpu")
    print(f"CPU: {cpu_isa()}; precision {precision}; {SIZE}x{SIZE} RGB, batch {BATCH}, Adadelta")
    with tempfile.TemporaryDirectory() as scratch:
        processed = Path(scratch) / "processed"
        kiln.prepare_dataset(REPO / "data" / "sample", processed, image_size=(SIZE, SIZE), channels=3)
        for name in args.models:
            ratios = []
            for round_ in range(args.rounds):
                ours, theirs = measure_round(processed, name, args.steps, precision)
                ratios.append(ours / theirs)
                figures = f"kiln {ours:.1f} img/s, pytorch {theirs:.1f} img/s, {ours / theirs:.2f}x"
                print(f"{name} round {round_ + 1}: {figures}")
            print(f"{name}: kiln / pytorch = {statistics.median(ratios):.2f}x (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
