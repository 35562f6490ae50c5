"""`python src/train_model.py setup_mlflow=false`: where the checkpoints of untracked runs and sweep trials go,
and the progress bar's count of images when the last batch is partial."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from conftest import run_app


def untracked(processed: Path, root: Path, *overrides: str) -> list[str]:
    return [
        f"data_dir_path={processed}",
        f"artifact_dir_path={root / 'models'}",
        f"log_dir={root / 'logs'}",
        "setup_mlflow=false",
        "epochs=1",
        "test_limit=20",
        *overrides,
    ]


def bar_counts(output: str) -> set[str]:
    """The `done/total` images of the epoch bars' last refresh (tqdm rewrites its line after a carriage return)."""
    return set(re.findall(r"Epoch 1: 100%\|[^|]*\| (\d+/\d+) ", output))


def test_an_untracked_run_counts_each_image_once_and_keeps_its_checkpoint_at_the_artifact_dir(
    tmp_path: Path, processed_sample: Path
) -> None:
    # 50 images in batches of 16: three full batches and one of 2, so not 64.
    result = run_app(
        "train_model.py", *untracked(processed_sample, tmp_path, "train_limit=50", "train_bs=16"), cwd=tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert bar_counts(output) == {"50/50"}, output
    checkpoint = tmp_path / "models" / "checkpoint.pt"
    assert f"Checkpoints go to {checkpoint}" in output
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1


def test_each_trial_of_an_untracked_sweep_keeps_its_own_checkpoint(tmp_path: Path, processed_sample: Path) -> None:
    result = run_app(
        "train_model.py",
        "--multirun",
        *untracked(processed_sample, tmp_path, "train_limit=70"),
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        cwd=tmp_path,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # The seed's search space: batches of 32, 48 or 64, none of which divides 70.
    assert bar_counts(output) == {"70/70"}, output
    tag = (tmp_path / "multirun" / "hptuning_tag").read_text().strip()
    trials = [tmp_path / "models" / f"sweep-{tag}" / f"trial-{number}" / "checkpoint.pt" for number in (0, 1)]
    for checkpoint in trials:
        assert f"Checkpoints go to {checkpoint}" in output
    first, second = (torch.load(checkpoint, weights_only=True) for checkpoint in trials)
    # Two trials' own models: different learning rates or batch sizes, different weights.
    assert not torch.equal(first["model"]["state_dict"]["fc2.weight"], second["model"]["state_dict"]["fc2.weight"])
    assert not (tmp_path / "models" / "checkpoint.pt").exists()
