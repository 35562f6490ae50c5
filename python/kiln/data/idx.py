"""Read IDX files and write them out as a ``<split>/<class name>/<index>.png`` tree."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import socket
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# Third byte of the IDX magic number -> element type; data is stored big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
)
DIGIT_CLASSES: tuple[str, ...] = tuple(str(digit) for digit in range(10))

# Fashion-MNIST folders carry their label as a prefix so that sorted folder order
# (what ImageFolder-style loaders use to assign labels) equals the original label order.
CLASS_FOLDER_NAMES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": tuple(f"{label}_{name}" for label, name in enumerate(FASHION_MNIST_CLASSES)),
    "mnist": DIGIT_CLASSES,
    "digits": DIGIT_CLASSES,
}

# IDX file stem prefix -> output split name.
SPLIT_PREFIXES: dict[str, str] = {"train": "train", "t10k": "test"}

# 60000 images need five digits; using at least five everywhere keeps train and test names alike.
_MIN_INDEX_DIGITS = 5


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Return the array stored in an IDX file; a ``.gz`` suffix means gzip-compressed.

    Raises ``ValueError`` naming the file when the header is malformed or the payload size
    does not match the declared dimensions (e.g. a truncated download).
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                raw = stream.read()
        else:
            raw = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{path}: corrupt or truncated gzip data ({error})") from error

    if len(raw) < 4:
        raise ValueError(f"{path}: file is {len(raw)} bytes, too short for an IDX header")
    zero0, zero1, dtype_code, ndim = raw[:4]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(f"{path}: bad IDX magic number {raw[:4].hex()} (must start with 0000)")
    if dtype_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type code 0x{dtype_code:02x}")
    dtype = _IDX_DTYPES[dtype_code]

    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(
            f"{path}: truncated IDX header: {len(raw)} bytes, expected {header_size} for {ndim} dimensions"
        )
    shape = tuple(int(dim) for dim in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected_size = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected_size:
        problem = "truncated" if len(raw) < expected_size else "has trailing bytes"
        raise ValueError(f"{path}: {problem}: {len(raw)} bytes, expected {expected_size} for shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)


def _find_idx_file(idx_dir: Path, stem: str) -> Path:
    for candidate in (idx_dir / stem, idx_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"missing IDX file: neither {idx_dir / stem} nor {idx_dir / stem}.gz exists")


def _load_split(idx_dir: Path, prefix: str, class_count: int) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find_idx_file(idx_dir, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx_file(idx_dir, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"{images_path}: expected IDX magic 0x00000803 (3-D unsigned byte images), "
            f"got {images.ndim}-D {images.dtype}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{labels_path}: expected IDX magic 0x00000801 (1-D unsigned byte labels), "
            f"got {labels.ndim}-D {labels.dtype}"
        )
    if len(images) != len(labels):
        raise ValueError(f"{labels_path}: holds {len(labels)} labels but {images_path} holds {len(images)} images")
    if len(labels) and labels.max() >= class_count:
        raise ValueError(f"{labels_path}: label {labels.max()} out of range for {class_count} classes")
    return images, labels


def _selected_indices(labels: np.ndarray, per_class_limit: int | None) -> list[int]:
    """Indices to keep, in file order: the first ``per_class_limit`` of each class, or all."""
    if per_class_limit is None:
        return list(range(len(labels)))
    kept_per_class: Counter[int] = Counter()
    selected = []
    for index, label in enumerate(labels.tolist()):
        if kept_per_class[label] < per_class_limit:
            kept_per_class[label] += 1
            selected.append(index)
    return selected


def _write_split(
    images: np.ndarray,
    labels: np.ndarray,
    indices: Sequence[int],
    split_dir: Path,
    class_folders: Sequence[str],
) -> None:
    for folder in class_folders:
        (split_dir / folder).mkdir(parents=True)
    index_digits = max(_MIN_INDEX_DIGITS, len(str(len(images) - 1)))
    for index in indices:
        png_path = split_dir / class_folders[labels[index]] / f"{index:0{index_digits}d}.png"
        Image.fromarray(images[index]).save(png_path)


def _is_nonempty(path: Path) -> bool:
    """True unless ``path`` is missing or an empty directory."""
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _owner_tag() -> str:
    """``<host>-<pid>``: who writes a staging or retired tree, as kiln's C++ core names its temp files."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"
    return f"{host}-{os.getpid()}"


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A tree named with a bare pid (before kiln recorded the host) must be this old to count as stale: a
# pid alone cannot tell this host's processes from those of another machine sharing the volume.
_UNOWNED_TREE_AGE_S = 3600


def _left_by_dead_process(tag: str, path: Path) -> bool:
    """Whether ``path``, named with ``tag``, was left by a process that no longer runs: ``tag`` names this
    host and a pid that is not running. Another host's trees (a shared volume) are never stale here."""
    host, _, pid = tag.rpartition("-")
    if not pid.isdigit() or not 0 < int(pid) < 2**31:
        return False
    if host:
        return host == _owner_tag().rpartition("-")[0] and not _process_runs(int(pid))
    try:
        age = time.time() - path.lstat().st_mtime
    except OSError:
        return False
    return not _process_runs(int(pid)) and age > _UNOWNED_TREE_AGE_S


def _remove_stale_trees(out: Path) -> None:
    """Remove ``<out>.tmp-<owner>`` staging trees, and ``<out>.old-<owner>`` retired ones while ``out``
    exists, that killed runs left behind; never a live process's or another host's."""
    if not out.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        if kind == "old" and not (out.exists() or out.is_symlink()):
            continue  # the retired tree is then the only copy of the previous result
        prefix = f"{out.name}.{kind}-"
        for path in out.parent.iterdir():
            if path.name.startswith(prefix) and _left_by_dead_process(path.name[len(prefix) :], path):
                _remove(path)


def idx_to_png_tree(
    idx_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    classes: str = "fashion-mnist",
    per_class_limit: int | None = None,
    test_per_class_limit: int | None = None,
    overwrite: bool = False,
) -> dict[str, int]:
    """Convert the IDX files in ``idx_dir`` into ``out/{train,test}/<class folder>/<index>.png``.

    ``per_class_limit`` keeps the first N images of each class in each split;
    ``test_per_class_limit`` overrides it for the test split. The tree is built in a sibling
    temporary directory and renamed into place only when complete, so ``out`` never holds
    a partial result. Returns the number of images written per split.
    """
    idx_dir = Path(idx_dir)
    out = Path(out)
    if classes not in CLASS_FOLDER_NAMES:
        raise ValueError(f"unknown class set {classes!r}; choose from {', '.join(CLASS_FOLDER_NAMES)}")
    for limit in (per_class_limit, test_per_class_limit):
        if limit is not None and limit < 1:
            raise ValueError(f"per-class limit must be at least 1, got {limit}")
    # Checked before any work so that a refused run costs nothing.
    if _is_nonempty(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")

    class_folders = CLASS_FOLDER_NAMES[classes]
    # Load and validate every file before writing anything.
    splits = {split: _load_split(idx_dir, prefix, len(class_folders)) for prefix, split in SPLIT_PREFIXES.items()}
    split_limits = {
        "train": per_class_limit,
        "test": test_per_class_limit if test_per_class_limit is not None else per_class_limit,
    }

    _remove_stale_trees(out)
    staging = out.with_name(f"{out.name}.tmp-{_owner_tag()}")
    _remove(staging)  # left over from a crashed run whose pid was reused
    counts: dict[str, int] = {}
    try:
        for split, (images, labels) in splits.items():
            indices = _selected_indices(labels, split_limits[split])
            _write_split(images, labels, indices, staging / split, class_folders)
            counts[split] = len(indices)
        if out.exists() or out.is_symlink():
            # rename() cannot replace a non-empty directory, so move the old tree aside first.
            retired = out.with_name(f"{out.name}.old-{_owner_tag()}")
            _remove(retired)
            out.rename(retired)
            staging.rename(out)
            _remove(retired)
        else:
            staging.rename(out)
    finally:
        _remove(staging)
    return counts
