"""Streaming data loading: kiln's C++ loader over a processed dataset's shards, and the memory budget
that decides whether training keeps a dataset resident or streams it.

``python src/train_model.py`` uses the loader through ``kiln.Trainer``; :class:`DataLoader` gives the same
batches to a user's own PyTorch loop::

    from kiln.loader import DataLoader

    loader = DataLoader("data/processed", split="train", batch_size=32,
                        transforms={"train": {"random_resized_crop": {"size": [224, 224]}, "horizontal_flip": 0.5}})
    for epoch in range(3):
        for images, labels in loader:  # uint8 [B, C, H, W] and int64 [B], valid until the next batch
            ...
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# Half of the memory this process may use: the rest stays for the model, activations and the page cache.
DEFAULT_BUDGET_FRACTION = 0.5

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def available_memory() -> int:
    """Bytes of memory this process may use: physical memory, or the cgroup's limit when lower (a
    container's or a Kubernetes pod's memory limit)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def data_memory_budget(value: Any, key: str = "data_memory_budget") -> int:
    """The budget in bytes: ``auto`` (half of :func:`available_memory`), a size such as ``512MiB``,
    ``2GB`` or ``1.5GiB``, a number of bytes, or 0 (no limit: always resident)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return int(available_memory() * DEFAULT_BUDGET_FRACTION)
    if isinstance(value, bool):
        raise ValueError(f"{key} must be auto, a size such as 2GiB or a number of bytes, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{key} must not be negative, got {value!r}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"{key} must be auto, a size such as 512MiB, 2GB or 1.5GiB, or a number of bytes, got {value!r}"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def transform_options(transforms: Mapping[str, Any] | None) -> tuple[Any, Any]:
    """(train, eval) transform options for the core from the YAML's ``transforms`` group (or None)."""
    from kiln import transforms as kiln_transforms

    if not transforms:
        return None, None
    return kiln_transforms.train_options(transforms), kiln_transforms.eval_options(transforms)


class DataLoader:
    """Batches of a processed split, read from its shards by C++ worker threads that decode, transform
    (``transforms``: the ``transforms`` group of conf/train_model.yaml, with ``train`` and/or ``eval``) and
    collate them. Each iteration is one epoch: shuffled with ``seed`` and the epoch number (or in order),
    augmentation seeded per sample, so the same seed gives the same batches whatever ``num_workers`` is.
    ``augment=False`` applies only the evaluation transform. ``normalize=True`` makes the workers deliver
    float32 batches normalised with the manifest's mean and std (or give ``(mean, std)``), as kiln's trainer
    normalises them; ``channels_last`` lays those out as NHWC. Memory: the batches in flight and 16 bytes
    per sample, whatever the dataset's size."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        split: str = "train",
        *,
        batch_size: int = 32,
        transforms: Mapping[str, Any] | None = None,
        augment: bool = True,
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int = 1,
        prefetch_batches: int = 2,
        normalize: bool | tuple[list[float], list[float]] = False,
        channels_last: bool = False,
    ) -> None:
        import torch

        import kiln

        manifest = kiln.read_manifest(Path(data_dir))
        counts = {info.name: info.count for info in manifest.splits}
        if split not in counts:
            raise ValueError(f"processed dataset '{data_dir}' has no split '{split}' (it has: {', '.join(counts)})")
        self.size = counts[split]
        train, evaluation = transform_options(transforms)
        if normalize is True:
            mean, std = list(manifest.mean), list(manifest.std)
        elif normalize:
            mean, std = (list(values) for values in normalize)
        else:
            mean, std = [], []
        self._core = kiln._core.BatchLoader(
            Path(data_dir),
            split,
            batch_size=batch_size,
            train_transform=train,
            eval_transform=evaluation,
            augment=augment,
            num_workers=num_workers,
            seed=seed,
            prefetch_batches=prefetch_batches,
            mean=mean,
            std=std,
            channels_last=channels_last,
        )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self._torch = torch

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the batches' images."""
        return tuple(self._core.output_shape)

    @property
    def wait_seconds(self) -> float:
        """Seconds the current (or last) epoch's iteration waited for the workers."""
        return float(self._core.wait_seconds)

    def __len__(self) -> int:
        return (self.size + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        torch = self._torch
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        self._core.start_epoch(order, self.epoch)
        self.epoch += 1
        while (batch := self._core.next()) is not None:
            yield batch
