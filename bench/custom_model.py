"""Benchmark: training images/s of a user's own model, `model=python:<module>:<callable>` in kiln's C++
loop vs the same nn.Module in the best plain PyTorch loop.

    python bench/custom_model.py                       # both models at 28x28 grayscale and 64x64 RGB
    python bench/custom_model.py --models resnet --inputs 64rgb --steps 40 --rounds 3 --isa avx2
    python bench/custom_model.py --threads 1 --rounds 3  # one thread: steadier where other jobs share the cores

Models (tests/custom_models.py, plain torch.nn modules as a user writes them):
  small_cnn  python:custom_models:build         two conv/batch-norm/ReLU stages, dropout, linear head
  resnet     python:custom_models:build_resnet  3x3 stem + three basic blocks (16/32/64 channels)
The data: the embedded sample (data/sample) brought to 28x28 grayscale and 64x64 RGB by kiln.prepare_dataset.
Both sides train the same module from the same weights with Adadelta (lr 1.3, the template's), batch 32,
in the same precision (--precision; default kiln's precision=auto for this CPU, which the bench prints):
  kiln     kiln.Trainer(model="python:..."), what `python src/train_model.py model=python:...` runs: the
           module scripted by kiln.custom_model and trained by the C++ loop; images/s of its training
           batches as it reports them (bench/models.py's KilnSide)
  pytorch  the nn.Module in the best plain loop: uint8 tensors in memory, randperm batches, normalised per
           batch, channels-last model and input, bf16 autocast where the CPU has it, torch.optim.Adadelta
The two take turns every 5 batches after a warm-up of 5 each (bench/models.py's measurement), so a load
that comes and goes on the shared machine falls on both alike. Prints images/s for each (the median of its
5-batch chunks) and kiln's ratio, per round and the median over rounds, and the CPU's ISA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isa import add_isa_argument, apply_isa, cpu_isa  # noqa: E402
from models import BATCH, LR, REPO, measure_round  # noqa: E402  (puts tests/ on sys.path)

SEED = 1  # kiln.Trainer's default seed: the weights kiln.custom_model.register builds
MODELS = {"small_cnn": "python:custom_models:build", "resnet": "python:custom_models:build_resnet"}
INPUTS = {"28gray": (28, 1), "64rgb": (64, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--inputs", nargs="+", choices=sorted(INPUTS), default=sorted(INPUTS))
    parser.add_argument("--steps", type=int, default=30, help="measured training batches per contender and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument(
        "--threads", type=int, help="torch's threads for both sides (1: steadier figures on a busy machine)"
    )
    add_isa_argument(parser)
    args = parser.parse_args()
    apply_isa(args.isa)

    import torch

    import kiln
    from kiln import custom_model
    from kiln.precision import resolve_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, "cpu")
    print(f"CPU: {cpu_isa()}; precision {precision}; batch {BATCH}, Adadelta lr {LR}")
    with tempfile.TemporaryDirectory() as scratch:
        for input_name in args.inputs:
            size, channels = INPUTS[input_name]
            processed = Path(scratch) / input_name
            kiln.prepare_dataset(REPO / "data" / "sample", processed, image_size=(size, size), channels=channels)
            for model in args.models:
                name = MODELS[model]
                custom_model.register(name, processed, SEED)

                def build(classes: int, channels: int, name: str = name):  # the plain loop's copy of the module
                    return custom_model.build_module(name, classes, channels, SEED)

                label = f"{model} {size}x{size}x{channels}"
                ratios = []
                for round_ in range(args.rounds):
                    ours, theirs = measure_round(processed, name, args.steps, precision, build)
                    ratios.append(ours / theirs)
                    figures = f"kiln {ours:.1f} img/s, pytorch {theirs:.1f} img/s, {ours / theirs:.2f}x"
                    print(f"{label} round {round_ + 1}: {figures}", flush=True)
                print(f"{label}: kiln / pytorch = {statistics.median(ratios):.2f}x (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
