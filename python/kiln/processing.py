"""Data preparation behind ``python src/process_data.py``.

The C++ core decodes the raw image tree on all cores and commits the processed dataset; this module
turns the Hydra config into core options, shows progress, and logs what was skipped or converted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kiln.progress import ProgressBar

logger = logging.getLogger(__name__)

# Past this many, further skipped/converted files go to the debug log only; all are in the manifest.
MAX_FILES_LOGGED = 50


def _image_size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    size = tuple(value)
    if len(size) != 2:
        raise ValueError(f"image_size must be [height, width] or one int, got {list(size)}")
    return (int(size[0]), int(size[1]))


def _log_files(level: int, what: str, notes: list[Any]) -> None:
    for index, note in enumerate(notes):
        logger.log(
            level if index < MAX_FILES_LOGGED else logging.DEBUG,
            "%s %s: %s",
            what,
            note.path,
            note.reason,
        )
    if len(notes) > MAX_FILES_LOGGED:
        logger.log(
            level,
            "%d more files %s; all are listed in manifest.json and the debug log",
            len(notes) - MAX_FILES_LOGGED,
            what.lower(),
        )


def _raw_dirs(value: Any) -> Path | list[Path]:
    """One raw tree, or a list of them (the template guide's RAW_DATA_DIRS: `raw_data_dir_path=[a,b]`)."""
    if isinstance(value, str | Path):
        return Path(value)
    if isinstance(value, Sequence):
        dirs = [Path(item) for item in value]
        if not dirs:
            raise ValueError("raw_data_dir_path is an empty list; give one raw dir or a list of them")
        return dirs
    raise ValueError(f"raw_data_dir_path must be a path or a list of paths, got {value!r}")


# The C++ core's default pixel budget per image (kiln::kDefaultMaxImagePixels, Pillow's MAX_IMAGE_PIXELS).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def max_image_pixels(value: Any, key: str) -> int:
    """The pixel budget (width x height) a config gives images; the default when the key is unset."""
    if value is None:
        return DEFAULT_MAX_IMAGE_PIXELS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a whole number of pixels of at least 1 (width x height), got {value!r}")
    return value


STORAGES = ("auto", "decoded", "encoded")
ENCODINGS = ("png", "jpeg", "original")


def _choice(cfg: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = cfg[key]
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _megabytes(cfg: Mapping[str, Any], key: str, *, zero_allowed: bool) -> int:
    """A size in MiB from the config, as bytes; fractions are fine (shard_size_mb=0.5)."""
    value = cfg[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value >= 0 if zero_allowed else value > 0)
        or value == float("inf")
    ):
        bound = "0 or more" if zero_allowed else "above 0"
        raise ValueError(f"{key} must be a number of MiB, {bound}, got {value!r}")
    return int(value * 2**20)


def _jpeg_quality(cfg: Mapping[str, Any]) -> int:
    value = cfg["jpeg_quality"]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise ValueError(f"jpeg_quality must be a whole number in 1..100, got {value!r}")
    return value


def process_data(cfg: Mapping[str, Any]):
    """Prepare ``cfg["raw_data_dir_path"]`` into ``cfg["processed_data_dir_path"]``.

    ``raw_data_dir_path`` is one raw tree or a list of them, combined into one dataset: splits of the
    same name joined, classes merged by folder name, files of several trees listed in the manifest by
    absolute path (so the same relative name in two trees stays two entries).
    Returns the dataset's :class:`kiln.Manifest`. Raises ``FileNotFoundError`` for a missing raw
    dir and ``ValueError`` (``kiln.DataError``) when the tree holds nothing usable; a previous
    processed dataset is then left as it was.
    """
    import kiln

    raw_dir = _raw_dirs(cfg["raw_data_dir_path"])
    pixel_budget = max_image_pixels(cfg.get("max_image_pixels"), "max_image_pixels")
    storage_options = {
        "storage": _choice(cfg, "storage", STORAGES),
        "encoding": _choice(cfg, "encoding", ENCODINGS),
        "jpeg_quality": _jpeg_quality(cfg),
        "shard_bytes": _megabytes(cfg, "shard_size_mb", zero_allowed=False),
        "auto_decoded_max_bytes": _megabytes(cfg, "auto_decoded_max_mb", zero_allowed=True),
    }
    out_dir = Path(cfg["processed_data_dir_path"])
    for path in raw_dir if isinstance(raw_dir, list) else [raw_dir]:
        if not path.exists():
            raise FileNotFoundError(
                f"raw data dir '{path}' does not exist; point raw_data_dir_path at a "
                "<raw>/<split>/<class>/<image> tree, or a list of them (kiln's embedded sample: "
                "raw_data_dir_path=./data/sample)"
            )
    prepare_dataset = kiln.prepare_dataset  # loads the C++ core before the clock starts
    if not cfg["no_cuda"]:
        logger.info("Data preparation decodes on the CPU; no_cuda=false only matters for training.")
    sources = ", ".join(str(path) for path in raw_dir) if isinstance(raw_dir, list) else str(raw_dir)
    logger.info("Preparing images from %s into %s", sources, out_dir)

    progress = ProgressBar("Decoding images", unit="img")
    started = time.perf_counter()
    try:
        manifest = prepare_dataset(
            raw_dir,
            out_dir,
            image_size=_image_size(cfg["image_size"]),
            channels=cfg["channels"],
            num_workers=int(cfg["num_workers"] or 0),
            max_image_pixels=pixel_budget,
            **storage_options,
            progress=progress,
        )
    finally:
        progress.close()
    elapsed = time.perf_counter() - started

    _log_files(logging.WARNING, "Skipped", manifest.skipped)
    _log_files(logging.INFO, "Converted", manifest.converted)
    for warning in manifest.warnings:
        logger.warning(warning)
    images = sum(split.count for split in manifest.splits)
    logger.info(
        "Prepared %d images (%s) of %dx%d with %d channel(s) in %d classes into %s in %.2fs "
        "(%.0f images/s); %d files skipped, %d converted",
        images,
        ", ".join(f"{split.name}: {split.count}" for split in manifest.splits),
        manifest.image.height,
        manifest.image.width,
        manifest.image.channels,
        len(manifest.classes),
        out_dir,
        elapsed,
        images / elapsed if elapsed > 0 else float("inf"),
        len(manifest.skipped),
        len(manifest.converted),
    )
    shards = sum(len(split.shards) for split in manifest.splits)
    stored_mb = sum(split.bytes for split in manifest.splits) / 2**20
    if manifest.storage == "encoded":
        logger.info("Stored %s-encoded in %d shards (%.1f MiB)", manifest.encoding, shards, stored_mb)
    else:
        logger.info("Stored decoded in %d shards (%.1f MiB)", shards, stored_mb)
    return manifest
