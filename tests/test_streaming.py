"""Training on data over its memory budget: streamed from the dataset's shards with the resident path's
metrics, with bounded memory, augmented; and kiln.loader.DataLoader for a user's own loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kiln
from conftest import REPO, run_app
from kiln.loader import DataLoader, data_memory_budget

# Photos of 256x256 RGB: 480 training images are 94 MB decoded, several times the budgets below.
PHOTO_SIZE = 256
TRAIN_PHOTOS = 480
TEST_PHOTOS = 32
# Trained at 32x32 (the transforms shrink every photo) so an epoch costs seconds, not minutes.
SMALL_TRANSFORMS = [
    "transforms.train.random_resized_crop={size: [32, 32], scale: [0.5, 1.0]}",
    "transforms.train.horizontal_flip=0.5",
    "transforms.eval.resize=32",
]


def _write_photos(raw: Path, per_split: dict[str, int], seed: int = 0) -> None:
    """Two classes of smooth colour images: reddish ("warm") and bluish ("cold"), as JPEGs."""
    rng = np.random.default_rng(seed)
    for split, count in per_split.items():
        for index in range(count):
            label = index % 2
            small = rng.integers(0, 120, size=(8, 8, 3), dtype=np.uint8)
            small[..., 0 if label == 0 else 2] += 120  # warm: more red, cold: more blue
            image = Image.fromarray(small).resize((PHOTO_SIZE, PHOTO_SIZE), Image.BICUBIC)
            folder = raw / split / ("warm" if label == 0 else "cold")
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:04d}.jpg", quality=90)


def _prepare(root: Path, per_split: dict[str, int], storage: str) -> Path:
    _write_photos(root / "raw", per_split)
    processed = root / "processed"
    kiln.prepare_dataset(root / "raw", processed, storage=storage, shard_bytes=8 << 20)
    return processed


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(tmp_path_factory.mktemp("photos"), {"train": TRAIN_PHOTOS, "test": TEST_PHOTOS}, "decoded")


def _train_peak_rss(tmp_path: Path, data: Path, *overrides: str) -> tuple[int, str]:
    """Runs train_model.py in a process of its own; returns its peak RSS in bytes and its output."""
    # VmHWM: this process image's peak RSS. (getrusage's ru_maxrss survives exec: a child of a large pytest
    # process reports the parent's size.)
    script = (
        "import atexit, re, runpy, sys\n"
        "atexit.register(lambda: print('PEAK_RSS_KB', re.search(r'VmHWM:\\s*(\\d+)', "
        "open('/proc/self/status').read()).group(1), file=sys.stderr))\n"
        f"sys.argv = [{str(REPO / 'src' / 'train_model.py')!r}] + sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            f"data_dir_path={data}",
            "setup_mlflow=false",
            "epochs=1",
            "train_bs=32",
            "test_bs=32",
            f"artifact_dir_path={tmp_path / 'models'}",
            f"hydra.run.dir={tmp_path / 'outputs'}",
            *SMALL_TRANSFORMS,
            *overrides,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    peak_kb = int(output.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return peak_kb * 1024, output


def test_a_dataset_over_the_budget_trains_streamed_with_memory_bounded_by_the_budget(
    tmp_path: Path, photos: Path
) -> None:
    dataset_bytes = (TRAIN_PHOTOS + TEST_PHOTOS) * 3 * PHOTO_SIZE * PHOTO_SIZE
    # The same run on a tiny dataset of the same photos: the process's footprint without the data.
    tiny = _prepare(tmp_path / "tiny", {"train": 32, "test": 8}, "decoded")
    baseline, _ = _train_peak_rss(tmp_path / "run-tiny", tiny)
    streamed, output = _train_peak_rss(tmp_path / "run-streamed", photos, "data_memory_budget=16MiB", "num_workers=2")
    assert "streamed from the shards" in output, output
    resident, output = _train_peak_rss(tmp_path / "run-resident", photos)
    assert "resident" in output, output

    mib = 1 << 20
    report = (
        f"dataset {dataset_bytes / mib:.0f} MiB decoded; peak RSS: tiny {baseline / mib:.0f} MiB, "
        f"streamed {streamed / mib:.0f} MiB, resident {resident / mib:.0f} MiB"
    )
    print(report)
    # Streamed: the loader's batch buffers and labels over the tiny run, far below the data's 96 MiB
    # (budget 16 MiB). Resident: the dataset is in the process (peak RSS varies by ~10 MiB run to run).
    assert streamed < baseline + 24 * mib, report
    assert resident > baseline + dataset_bytes * 0.7, report


def test_streamed_and_resident_training_give_the_same_metrics(tmp_path: Path, processed_sample: Path) -> None:
    histories = {}
    for name, budget in (("resident", "auto"), ("streamed", "1")):
        models = tmp_path / name
        result = run_app(
            "train_model.py",
            f"data_dir_path={processed_sample}",
            "setup_mlflow=false",
            "epochs=2",
            "train_limit=400",
            f"data_memory_budget={budget}",
            f"artifact_dir_path={models}",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        saved = torch.load(models / "checkpoint.pt", weights_only=True)
        histories[name] = [
            {key: epoch[key] for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")}
            for epoch in saved["history"]
        ]
    assert histories["streamed"] == histories["resident"]


def test_data_loader_batches_follow_the_seed_not_the_worker_count(photos: Path) -> None:
    transforms = {"train": {"random_resized_crop": {"size": [48, 48]}, "horizontal_flip": 0.5}}

    def epochs(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(photos, "train", batch_size=64, transforms=transforms, num_workers=workers, seed=3)
        assert loader.output_shape == (3, 48, 48)
        assert len(loader) == (TRAIN_PHOTOS + 63) // 64
        return [torch.cat([images.clone() for images, _ in loader]) for _ in range(2)]

    one, three = epochs(1), epochs(3)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])
    assert not torch.equal(one[0], one[1])  # a new epoch: another order and other augmentation draws
    assert one[0].shape == (TRAIN_PHOTOS, 3, 48, 48)


def test_data_loader_without_transforms_gives_the_stored_pixels(photos: Path) -> None:
    loader = DataLoader(photos, "test", batch_size=10, shuffle=False)
    images = torch.cat([batch.clone() for batch, _ in loader])
    assert torch.equal(images, kiln.load_split(photos, "test")[0])
    assert loader.wait_seconds >= 0


def test_a_truncated_shard_fails_streamed_training_naming_the_shard(tmp_path: Path) -> None:
    data = _prepare(tmp_path, {"train": 40, "test": 8}, "decoded")
    shard = sorted(data.glob("train-*.pt"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    result = run_app(
        "train_model.py",
        f"data_dir_path={data}",
        "setup_mlflow=false",
        "data_memory_budget=1",
        f"artifact_dir_path={tmp_path / 'models'}",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert shard.name in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data_memory_budget=lots"], "data_memory_budget must be auto, a size such as 512MiB"),
        (["data_memory_budget=-5"], "data_memory_budget must not be negative"),
        (
            ["transforms.train.random_resized_crop=28", "transforms.eval.center_crop=20"],
            "training's transforms give 28x28 images but evaluation's give 20x20",
        ),
    ],
)
def test_bad_data_loading_settings_fail_before_training_naming_the_key(
    tmp_path: Path, processed_sample: Path, overrides: list[str], message: str
) -> None:
    result = run_app(
        "train_model.py",
        f"data_dir_path={processed_sample}",
        "setup_mlflow=false",
        "epochs=1",
        *overrides,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert message in result.stdout + result.stderr


def test_memory_budget_sizes() -> None:
    assert data_memory_budget("512MiB") == 512 << 20
    assert data_memory_budget("2GB") == 2_000_000_000
    assert data_memory_budget("1.5GiB") == 3 << 29
    assert data_memory_budget(0) == 0
    assert 0 < data_memory_budget("auto") < 1 << 50
    with pytest.raises(ValueError, match="data_memory_budget"):
        data_memory_budget("12 parsecs")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
