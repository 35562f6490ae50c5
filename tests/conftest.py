"""Shared fixtures: the repo's paths, sample data subsets and a runner for the real Hydra apps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


def run_app(script: str, *overrides: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python src/<script> <overrides>` as a user would, from `cwd`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "src" / script),
            *overrides,
            f"hydra.run.dir={cwd / 'outputs'}",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def copy_sample(destination: Path, per_class: int, classes: int = 10) -> Path:
    """Copy the first `per_class` images of the first `classes` classes of each sample split."""
    for split_dir in sorted(SAMPLE.iterdir()):
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir())[:classes]:
            target = destination / split_dir.name / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:per_class]:
                shutil.copyfile(image, target / image.name)
    return destination


@pytest.fixture
def small_raw(tmp_path: Path) -> Path:
    return copy_sample(tmp_path / "raw", per_class=5, classes=3)
