"""Benchmark: images/s a training loop receives from kiln's streaming loader vs torchvision's ImageFolder + DataLoader.

    python bench/loader.py                          # 4000 JPEG photos, 256x256, RandomResizedCrop(224) + flip
    python bench/loader.py --images 10000 --workers 4 --rounds 5
    python bench/loader.py --raw DIR                # any <raw>/train/<class>/<image> tree of photos
    python bench/loader.py --skip-training          # the loader figure only

The photos: Fashion-MNIST's train images (Debian's dataset-fashion-mnist; without it, the embedded
sample's, repeated) upscaled to 256x256 and colourised (a two-colour gradient background, a garment
colour, sensor-like noise, all random per image), saved as JPEG quality 90 (about 15 KB each) to
<tmp>/kiln-bench-photos-<N>x<size>, which later runs reuse.

Loaders, each in its own process, alternating; per round a warm-up epoch (shown apart: it starts the
workers) then --epochs measured epochs; batch 32, shuffled, num_workers = the cores (--workers), float
batches normalised with ImageNet's mean/std, which the loop receives:
  kiln         kiln.prepare_dataset(storage="encoded", encoding="original") keeps the JPEGs as they are in
               shards; kiln.loader.DataLoader(normalize=...) reads, decodes, crops, flips, normalises
               ((pixel / 255 - mean) / std, the trainer's constants) and collates float batches in C++ threads
  torchvision  ImageFolder(<raw>/train) (PIL decode, its default loader) with transforms.v2
               RandomResizedCrop(224), RandomHorizontalFlip, ToImage, ToDtype(float32, scale=True), Normalize;
               DataLoader(shuffle=True, persistent_workers=True): the plain loop a user writes
torchvision is imported through tests/torchvision_shim.py (PyPI's wheel beside the CPU torch).
Training: resnet18 on the sample at 64x64 RGB (640 train images, --train-limit, and 160 test images: its
2000 take minutes on 2 cores), one epoch of `python src/train_model.py` with the split
resident (the default) and streamed from its shards (data_memory_budget=1MiB, below the split's size).
Prints the CPU's ISA, both loaders' images/s and kiln's ratio per round, the median ratio over rounds and
the ratio of each side's best round; seconds per epoch resident vs streamed, the same way. A shared
machine's speed drifts (others' jobs can make one run several times slower), so the rounds alternate
which side goes first, and a best round is each side's least disturbed one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from isa import add_isa_argument, apply_isa, cpu_isa  # noqa: E402
from prep import DEBIAN_IDX  # noqa: E402

BATCH, CROP, SEED = 32, 224, 1
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TRAIN_SIZE, TEST_LIMIT, STREAMING_BUDGET = 64, 160, "1MiB"


def grayscale_sources():
    """(class folder names, uint8 [N, 28, 28] images, labels): Debian's Fashion-MNIST train split, else the sample's."""
    import numpy as np
    from PIL import Image

    from kiln.data.idx import CLASS_FOLDER_NAMES, read_idx

    if DEBIAN_IDX.is_dir():
        images = read_idx(DEBIAN_IDX / "train-images-idx3-ubyte.gz")
        labels = read_idx(DEBIAN_IDX / "train-labels-idx1-ubyte.gz")
        return CLASS_FOLDER_NAMES["fashion-mnist"], images, labels
    sample = REPO / "data" / "sample" / "train"
    folders = sorted(d.name for d in sample.iterdir() if d.is_dir())
    files = [(path, label) for label, name in enumerate(folders) for path in sorted((sample / name).iterdir())]
    images = np.stack([np.asarray(Image.open(path).convert("L")) for path, _ in files])
    return tuple(folders), images, np.array([label for _, label in files])


def write_photos(raw: Path, count: int, size: int) -> None:
    """<raw>/train/<class>/<index>.jpg: `count` grayscale images upscaled and colourised, the same files every run."""
    import numpy as np
    from PIL import Image

    folders, images, labels = grayscale_sources()
    building = raw.with_name(f"{raw.name}.building-{os.getpid()}")
    rows = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    # A seeded draw, as the sample's files come sorted by class; past its end (the sample is 2000 images)
    # the sources repeat and new colours still make each photo new.
    order = np.random.default_rng(SEED).permutation(len(images))
    for index in range(count):
        source = order[index % len(images)]
        rng = np.random.default_rng([SEED, index])
        gray = Image.fromarray(images[source]).resize((size, size), Image.Resampling.BICUBIC)
        garment = np.asarray(gray, dtype=np.float32)[:, :, None] / 255
        top, bottom, colour = rng.uniform(0, 255, (3, 3)).astype(np.float32)
        background = top + (bottom - top) * rows
        # Shading by the garment's own brightness keeps its texture; the noise gives JPEG a photo's detail to code.
        pixels = background * (1 - garment) + colour * (0.35 + 0.65 * garment) * garment
        pixels += rng.normal(0, 6, pixels.shape).astype(np.float32)
        photo = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        folder = building / "train" / folders[labels[source]]
        folder.mkdir(parents=True, exist_ok=True)  # only classes with photos: ImageFolder refuses empty ones
        photo.save(folder / f"{index:06d}.jpg", quality=90)
    building.rename(raw)  # whole or absent: an interrupted run leaves no half tree to reuse


def ensure_photos(args) -> Path:
    if args.raw is not None:
        return args.raw
    raw = Path(tempfile.gettempdir()) / f"kiln-bench-photos-{args.images}x{args.size}"
    if not (raw / "train").is_dir():
        source = DEBIAN_IDX if DEBIAN_IDX.is_dir() else "the embedded sample (no Debian dataset-fashion-mnist)"
        print(f"writing {args.images} JPEG photos of {args.size}x{args.size} from {source} to {raw} (once) ...")
        started = time.perf_counter()
        write_photos(raw, args.images, args.size)
        print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    return raw


def timed_epochs(loader, count: int, wait_seconds=None) -> list[dict]:
    """Per epoch of iterating `loader`: the images the loop received, the seconds it took and, when
    `wait_seconds` is given, the seconds it reports the loop waited on the workers."""
    epochs = []
    for _ in range(count):
        images_seen = 0
        started = time.perf_counter()
        for images, _labels in loader:
            images_seen += images.shape[0]
        epoch = {"images": images_seen, "seconds": time.perf_counter() - started}
        if wait_seconds is not None:
            epoch["wait_seconds"] = wait_seconds()
        epochs.append(epoch)
    return epochs


def kiln_epochs(args) -> list[dict]:
    """Per epoch: images and seconds of the loop over kiln's loader and the seconds it waited on the workers,
    which normalise as the baseline's workers do (float32 (pixel / 255 - mean) / std, ImageNet's)."""
    from kiln.loader import DataLoader

    transforms = {"train": {"random_resized_crop": {"size": [CROP, CROP]}, "horizontal_flip": 0.5}}
    loader = DataLoader(
        args.processed,
        split="train",
        batch_size=BATCH,
        num_workers=args.workers,
        seed=SEED,
        shuffle=True,
        transforms=transforms,
        normalize=(IMAGENET_MEAN, IMAGENET_STD),
    )
    return timed_epochs(loader, 1 + args.epochs, wait_seconds=lambda: loader.wait_seconds)


def torchvision_epochs(args) -> list[dict]:
    """Per epoch: images and seconds of the loop over ImageFolder + DataLoader."""
    import torch

    from torchvision_shim import import_torchvision

    torchvision = import_torchvision()
    from torchvision.transforms import v2

    transform = v2.Compose(
        [
            v2.RandomResizedCrop(CROP),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(args.raw / "train", transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(SEED),
    )
    return timed_epochs(loader, 1 + args.epochs)


def run_worker(kind: str, args) -> list[dict]:
    command = [sys.executable, __file__, "--worker", kind, "--raw", str(args.raw), "--processed", str(args.processed)]
    command += ["--workers", str(args.workers), "--epochs", str(args.epochs)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{kind} loader run failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def images_per_second(epochs: list[dict]) -> float:
    return sum(e["images"] for e in epochs) / sum(e["seconds"] for e in epochs)


def loader_figure(args, raw: Path, scratch: Path) -> None:
    import kiln

    args.raw, args.processed = raw, scratch / "photos-encoded"
    started = time.perf_counter()
    manifest = kiln.prepare_dataset(raw, args.processed, storage="encoded", encoding="original")
    prepare_seconds = time.perf_counter() - started
    count = manifest.split("train").count
    jpeg_kb = sum(p.stat().st_size for p in (raw / "train").rglob("*") if p.is_file()) / count / 1024
    print(f"{count} JPEG photos in {raw}, {jpeg_kb:.0f} KB average")
    print(f"kiln prepare_dataset (encoded, original): {prepare_seconds:.1f} s")
    print(f"batch {BATCH}, RandomResizedCrop({CROP}) + flip + normalise, {args.workers} workers")
    ratios, kiln_rates, torchvision_rates = [], [], []
    for round_ in range(args.rounds):
        if round_ % 2:
            theirs, ours = run_worker("torchvision", args), run_worker("kiln", args)
        else:
            ours, theirs = run_worker("kiln", args), run_worker("torchvision", args)
        kiln_rate, torchvision_rate = images_per_second(ours[1:]), images_per_second(theirs[1:])
        ratios.append(kiln_rate / torchvision_rate)
        kiln_rates.append(kiln_rate)
        torchvision_rates.append(torchvision_rate)
        measured_seconds = sum(e["seconds"] for e in ours[1:])
        waited = sum(e["wait_seconds"] for e in ours[1:]) / measured_seconds
        print(
            f"round {round_ + 1}: kiln {kiln_rate:.0f} img/s (the loop waited {waited:.0%}), "
            f"torchvision {torchvision_rate:.0f} img/s, {ratios[-1]:.2f}x; warm-up epoch: "
            f"kiln {images_per_second(ours[:1]):.0f}, torchvision {images_per_second(theirs[:1]):.0f} img/s"
        )
    best_kiln, best_torchvision = max(kiln_rates), max(torchvision_rates)
    print(
        f"loader: kiln / torchvision = {statistics.median(ratios):.2f}x (median of {args.rounds} rounds); "
        f"best rounds: kiln {best_kiln:.0f} img/s, torchvision {best_torchvision:.0f}, "
        f"{best_kiln / best_torchvision:.2f}x (target >= 3x)"
    )


EPOCH_LINE = re.compile(r"Epoch 1: .*\(([0-9.]+)s\)")


def train_seconds(processed: Path, scratch: Path, args, streamed: bool) -> float:
    """Seconds of the first epoch (train + test) that `python src/train_model.py` logs."""
    name = "streamed" if streamed else "resident"
    overrides = [
        f"data_dir_path={processed}",
        "model=resnet18",
        "setup_mlflow=false",
        "epochs=1",
        f"train_limit={args.train_limit}",
        f"test_limit={TEST_LIMIT}",
        f"num_workers={args.workers}",
        f"artifact_dir_path={scratch / name / 'models'}",
        f"log_dir={scratch / name / 'logs'}",
        f"hydra.run.dir={scratch / name / 'hydra'}",
    ]
    if streamed:
        overrides.append(f"data_memory_budget={STREAMING_BUDGET}")
    command = [sys.executable, str(REPO / "src" / "train_model.py"), *overrides]
    result = subprocess.run(command, capture_output=True, text=True, cwd=scratch)
    output = result.stdout + result.stderr
    found = EPOCH_LINE.search(output)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"train_model.py ({name}) failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    mode = "streamed from the shards" if streamed else "test, resident)"  # training.py's start line says which
    if mode not in output:
        raise SystemExit(f"train_model.py ({name}) did not train {name}:\n{result.stdout[-3000:]}")
    return float(found.group(1))


def training_figure(args, scratch: Path) -> None:
    import kiln

    processed = scratch / f"sample-rgb{TRAIN_SIZE}"
    manifest = kiln.prepare_dataset(
        REPO / "data" / "sample", processed, image_size=(TRAIN_SIZE, TRAIN_SIZE), channels=3
    )
    train_images = min(manifest.split("train").count, args.train_limit)
    print(
        f"resnet18, {TRAIN_SIZE}x{TRAIN_SIZE} RGB, {train_images} train + {TEST_LIMIT} test images, one epoch of "
        f"src/train_model.py: resident vs streamed (data_memory_budget={STREAMING_BUDGET})"
    )
    ratios, residents, streams = [], [], []
    for round_ in range(args.rounds):
        if round_ % 2:
            streamed = train_seconds(processed, scratch, args, streamed=True)
            resident = train_seconds(processed, scratch, args, streamed=False)
        else:
            resident = train_seconds(processed, scratch, args, streamed=False)
            streamed = train_seconds(processed, scratch, args, streamed=True)
        ratios.append(streamed / resident)
        residents.append(resident)
        streams.append(streamed)
        print(f"round {round_ + 1}: resident {resident:.1f} s/epoch, streamed {streamed:.1f} s, {ratios[-1]:.3f}x")
    print(
        f"training: streamed / resident = {statistics.median(ratios):.3f}x (median of {args.rounds} rounds); "
        f"best rounds: resident {min(residents):.1f} s, streamed {min(streams):.1f} s, "
        f"{min(streams) / min(residents):.3f}x (target <= 1.10x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, help="photo tree <raw>/train/<class>/<image>; default: generated")
    parser.add_argument("--images", type=int, default=4000, help="photos to generate (default 4000)")
    parser.add_argument("--size", type=int, default=256, help="generated photos' side in pixels (default 256)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="default: the cores")
    parser.add_argument("--epochs", type=int, default=1, help="measured epochs per loader and round, after warm-up")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=640, help="resnet18's training images (at most 2000)")
    parser.add_argument("--skip-training", action="store_true", help="only the loader figure")
    parser.add_argument("--worker", choices=["kiln", "torchvision"], help=argparse.SUPPRESS)
    parser.add_argument("--processed", type=Path, help=argparse.SUPPRESS)
    add_isa_argument(parser)
    args = parser.parse_args()
    apply_isa(args.isa)
    if args.worker:
        epochs = (kiln_epochs if args.worker == "kiln" else torchvision_epochs)(args)
        print(json.dumps(epochs))
        return

    print(f"CPU: {cpu_isa()}")
    raw = ensure_photos(args)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-loader-") as scratch:
        loader_figure(args, raw, Path(scratch))
        if not args.skip_training:
            training_figure(args, Path(scratch))


if __name__ == "__main__":
    main()
