"""End-to-end tests of ``python -m kiln.data from-idx`` on tiny synthetic IDX files."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln.data import read_idx

FASHION_FOLDERS = [
    "0_T-shirt_top",
    "1_Trouser",
    "2_Pullover",
    "3_Dress",
    "4_Coat",
    "5_Sandal",
    "6_Shirt",
    "7_Sneaker",
    "8_Bag",
    "9_Ankle_boot",
]
IMAGE_SIDE = 4


def idx_bytes(array: np.ndarray) -> bytes:
    assert array.dtype == np.uint8
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, *, compressed: bool) -> Path:
    data = idx_bytes(array)
    if compressed:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_split(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count, dtype=np.uint8)
    return images, labels


@pytest.fixture(params=[True, False], ids=["gz", "plain"])
def idx_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """Train (40 images) and t10k (25 images) IDX files, gzip-compressed or plain."""
    directory = tmp_path / "idx"
    directory.mkdir()
    for prefix, count, seed in (("train", 40, 1), ("t10k", 25, 2)):
        images, labels = make_split(count, seed)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images, compressed=request.param)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, compressed=request.param)
    return directory


def load_split(idx_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    def find(stem: str) -> Path:
        return next(idx_dir.glob(f"{stem}*"))

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    return images, labels


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiln.data", "from-idx", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )


def png_names(split_dir: Path) -> dict[str, list[str]]:
    return {folder.name: sorted(png.name for png in folder.iterdir()) for folder in sorted(split_dir.iterdir())}


def leftovers_beside(out: Path) -> list[str]:
    return sorted(path.name for path in out.parent.iterdir() if path.name.startswith(out.name))


def test_writes_every_image_under_its_class_folder(idx_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "png"
    result = run_cli("--idx-dir", idx_dir, "--out", out)

    assert result.returncode == 0, result.stderr
    assert "train 40" in result.stdout and "test 25" in result.stdout
    assert sorted(path.name for path in out.iterdir()) == ["test", "train"]
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = load_split(idx_dir, prefix)
        assert sorted(path.name for path in (out / split).iterdir()) == FASHION_FOLDERS
        expected = {folder: [] for folder in FASHION_FOLDERS}
        for index, label in enumerate(labels):
            expected[FASHION_FOLDERS[label]].append(f"{index:05d}.png")
        assert png_names(out / split) == expected
        for index in (0, len(images) - 1):
            png = out / split / FASHION_FOLDERS[labels[index]] / f"{index:05d}.png"
            with Image.open(png) as image:
                assert image.mode == "L"
                np.testing.assert_array_equal(np.asarray(image), images[index])
    assert leftovers_beside(out) == ["png"]


def test_per_class_limits_keep_the_first_images_of_each_class(idx_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "png"
    result = run_cli(
        "--idx-dir",
        idx_dir,
        "--out",
        out,
        "--classes",
        "mnist",
        "--per-class-limit",
        "2",
        "--test-per-class-limit",
        "1",
    )

    assert result.returncode == 0, result.stderr
    for split, prefix, limit in (("train", "train", 2), ("test", "t10k", 1)):
        _, labels = load_split(idx_dir, prefix)
        assert sorted(path.name for path in (out / split).iterdir()) == [str(d) for d in range(10)]
        for digit in range(10):
            first_indices = np.flatnonzero(labels == digit)[:limit]
            assert png_names(out / split)[str(digit)] == [f"{i:05d}.png" for i in first_indices]


def test_refuses_to_replace_a_non_empty_out_without_overwrite(idx_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "png"
    out.mkdir()
    (out / "keep.txt").write_text("precious")

    refused = run_cli("--idx-dir", idx_dir, "--out", out)

    assert refused.returncode != 0
    assert str(out) in refused.stderr
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert leftovers_beside(out) == ["png"]

    replaced = run_cli("--idx-dir", idx_dir, "--out", out, "--overwrite")

    assert replaced.returncode == 0, replaced.stderr
    assert sorted(path.name for path in out.iterdir()) == ["test", "train"]
    assert leftovers_beside(out) == ["png"]


@pytest.mark.parametrize("corrupt", ["truncated", "bad magic"])
def test_invalid_idx_file_fails_naming_it_and_writes_nothing(idx_dir: Path, tmp_path: Path, corrupt: str) -> None:
    images_path = next(idx_dir.glob("t10k-images-idx3-ubyte*"))
    raw = idx_bytes(load_split(idx_dir, "t10k")[0])
    raw = raw[:-7] if corrupt == "truncated" else b"\x08\x03" + raw[2:]
    if images_path.suffix == ".gz":
        images_path.write_bytes(gzip.compress(raw))
    else:
        images_path.write_bytes(raw)
    out = tmp_path / "png"

    result = run_cli("--idx-dir", idx_dir, "--out", out)

    assert result.returncode != 0
    assert str(images_path) in result.stderr
    assert "Traceback" not in result.stderr
    assert leftovers_beside(out) == []


def test_truncated_gzip_stream_fails_naming_the_file(tmp_path: Path) -> None:
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    for prefix, count, seed in (("train", 10, 1), ("t10k", 10, 2)):
        images, labels = make_split(count, seed)
        write_idx(idx_dir / f"{prefix}-images-idx3-ubyte", images, compressed=True)
        write_idx(idx_dir / f"{prefix}-labels-idx1-ubyte", labels, compressed=True)
    labels_path = idx_dir / "train-labels-idx1-ubyte.gz"
    labels_path.write_bytes(labels_path.read_bytes()[:-10])
    out = tmp_path / "png"

    result = run_cli("--idx-dir", idx_dir, "--out", out)

    assert result.returncode != 0
    assert str(labels_path) in result.stderr
    assert leftovers_beside(out) == []


def test_label_count_mismatch_is_reported(idx_dir: Path, tmp_path: Path) -> None:
    for path in idx_dir.glob("train-labels-idx1-ubyte*"):
        path.unlink()
    labels_path = write_idx(idx_dir / "train-labels-idx1-ubyte", np.zeros(39, dtype=np.uint8), compressed=False)

    result = run_cli("--idx-dir", idx_dir, "--out", tmp_path / "png")

    assert result.returncode != 0
    assert str(labels_path) in result.stderr and "39 labels" in result.stderr


def test_missing_idx_file_is_named(idx_dir: Path, tmp_path: Path) -> None:
    for path in idx_dir.glob("t10k-labels-idx1-ubyte*"):
        path.unlink()

    result = run_cli("--idx-dir", idx_dir, "--out", tmp_path / "png")

    assert result.returncode != 0
    assert str(idx_dir / "t10k-labels-idx1-ubyte") in result.stderr
    assert not (tmp_path / "png").exists()
