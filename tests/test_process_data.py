"""Data preparation: `kiln.processing.process_data(cfg)` on configs composed from
conf/process_data.yaml, and `python src/process_data.py` end to end for the command's contract (exit
codes, messages, log files, template-style overrides); the compiled core, real files."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kiln
from conftest import SAMPLE, copy_sample, run_app
from kiln.cli import compose_config
from kiln.processing import process_data


def prepare(raw: Path | str, processed: Path, *overrides: str) -> kiln.Manifest:
    """What `python src/process_data.py raw_data_dir_path=<raw> processed_data_dir_path=<processed>`
    runs, in this process."""
    config = compose_config(
        "process_data", [f"raw_data_dir_path={raw}", f"processed_data_dir_path={processed}", *overrides]
    )
    return process_data(config)


def read_manifest_json(processed: Path) -> dict:
    return json.loads((processed / "manifest.json").read_text(encoding="utf-8"))


def test_sample_is_prepared_into_tensors_torch_load_reads(tmp_path: Path) -> None:
    result = run_app(
        "process_data.py",
        f"raw_data_dir_path={SAMPLE}",
        f"processed_data_dir_path={tmp_path / 'processed'}",
        f"log_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    manifest = read_manifest_json(tmp_path / "processed")
    classes = sorted(p.name for p in (SAMPLE / "train").iterdir())
    assert manifest["classes"] == classes
    assert manifest["image_shape"] == [1, 28, 28]
    assert manifest["splits"]["train"]["count"] == 2000
    assert manifest["splits"]["test"]["count"] == 500
    assert manifest["skipped"] == []
    # Fashion-MNIST's pixel statistics, as computed from the sample's train split.
    assert manifest["normalization"]["mean"][0] == pytest.approx(0.286, abs=0.01)
    assert manifest["normalization"]["std"][0] == pytest.approx(0.353, abs=0.01)

    train = torch.load(tmp_path / "processed" / "train.pt", weights_only=True)
    assert train["images"].dtype == torch.uint8 and train["images"].shape == (2000, 1, 28, 28)
    assert train["labels"].dtype == torch.int64
    assert torch.bincount(train["labels"]).tolist() == [200] * 10
    # Row i is the i-th file in sorted order; its pixels are the PNG's, decoded by PIL.
    files = [f for c in classes for f in sorted((SAMPLE / "train" / c).iterdir())]
    for row in (0, 777, 1999):
        expected = np.asarray(Image.open(files[row]))
        assert np.array_equal(train["images"][row, 0].numpy(), expected)
        assert train["labels"][row].item() == classes.index(files[row].parent.name)

    info_log = (tmp_path / "logs" / "info.log").read_text(encoding="utf-8")
    assert "Prepared 2500 images" in info_log


def test_same_input_gives_identical_files(tmp_path: Path, small_raw: Path) -> None:
    prepare(small_raw, tmp_path / "a", "num_workers=1")
    prepare(small_raw, tmp_path / "b", "num_workers=2")
    for file in ("train.pt", "test.pt", "manifest.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


def test_bad_files_are_skipped_listed_logged_and_the_rest_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = copy_sample(tmp_path / "raw", per_class=4, classes=2)
    shirts = raw / "train" / "0_T-shirt_top"
    good_png = sorted(shirts.iterdir())[0].read_bytes()
    (shirts / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (shirts / "zero-bytes.png").write_bytes(b"")
    (shirts / "text.png").write_text("not an image\n")
    Image.new("L", (56, 56), 128).save(shirts / "bigger.png")
    Image.new("RGB", (28, 28), (10, 200, 30)).save(shirts / "colour.png")
    (shirts / "gone.png").symlink_to(tmp_path / "does-not-exist.png")
    Image.new("L", (28, 28), 7).save(shirts / "ünïcödé-名前.png")
    (shirts / "破損.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    empty_class = raw / "train" / "9_empty"
    empty_class.mkdir()
    (empty_class / "broken.png").write_bytes(b"broken")

    with caplog.at_level(logging.WARNING):
        prepare(raw, tmp_path / "processed")
    manifest = read_manifest_json(tmp_path / "processed")
    skipped = {item["path"]: item["reason"] for item in manifest["skipped"]}
    prefix = "train/0_T-shirt_top/"
    assert set(skipped) == {
        prefix + "truncated.png",
        prefix + "zero-bytes.png",
        prefix + "text.png",
        prefix + "gone.png",
        prefix + "破損.png",
        "train/9_empty/broken.png",
    }
    assert "truncated PNG" in skipped[prefix + "truncated.png"]
    assert skipped[prefix + "zero-bytes.png"] == "empty file (0 bytes)"
    assert "not an image" in skipped[prefix + "text.png"]
    assert "cannot open file" in skipped[prefix + "gone.png"]
    assert manifest["skipped_count"] == 6
    converted = {item["path"]: item["reason"] for item in manifest["converted"]}
    assert converted == {
        prefix + "bigger.png": "resized from 56x56 to 28x28",
        prefix + "colour.png": "converted RGB to grayscale",
    }
    assert manifest["splits"]["train"]["class_counts"]["0_T-shirt_top"] == 4 + 3
    assert manifest["splits"]["train"]["class_counts"]["9_empty"] == 0
    assert "class folder 'train/9_empty' has no usable images" in manifest["warnings"]

    train = torch.load(tmp_path / "processed" / "train.pt", weights_only=True)
    assert train["images"].shape[0] == manifest["splits"]["train"]["count"] == 11
    assert (train["images"] == 7).flatten(1).all(dim=1).sum() == 1  # the non-ASCII named image

    # What conf/logging.yaml's warn.log receives (tests/test_general_utils.py checks that routing).
    warn_log = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    for path in skipped:
        assert path in warn_log
    assert "9_empty" in warn_log


def test_missing_raw_dir_fails_with_one_clear_message(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    result = run_app("process_data.py", f"raw_data_dir_path={missing}", cwd=tmp_path)
    assert result.returncode != 0
    assert str(missing) in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "processed").exists()


def test_raw_dir_without_images_fails_and_keeps_previous_dataset(tmp_path: Path, small_raw: Path) -> None:
    processed = tmp_path / "processed"
    prepare(small_raw, processed)
    before = (processed / "train.pt").read_bytes()
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    result = run_app(
        "process_data.py",
        f"raw_data_dir_path={empty}",
        f"processed_data_dir_path={processed}",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert f"no images found under raw data dir '{empty}'" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert (processed / "train.pt").read_bytes() == before


def test_template_style_prefixed_overrides_work(tmp_path: Path, small_raw: Path) -> None:
    result = run_app(
        "process_data.py",
        f"process_data.raw_data_dir_path={small_raw}",
        f"process_data.processed_data_dir_path={tmp_path / 'p'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p" / "manifest.json").exists()


def test_image_size_and_channels_options(tmp_path: Path, small_raw: Path) -> None:
    prepare(small_raw, tmp_path / "p", "image_size=[32,24]", "channels=3")
    test = torch.load(tmp_path / "p" / "test.pt", weights_only=True)
    assert test["images"].shape[1:] == (3, 32, 24)
    with pytest.raises(ValueError, match=re.escape("channels must be 1 (grayscale) or 3 (RGB), got 2")):
        prepare(small_raw, tmp_path / "q", "channels=2")


def test_ctrl_c_stops_cleanly_and_keeps_previous_dataset(tmp_path: Path, small_raw: Path) -> None:
    processed = tmp_path / "processed"
    kiln.prepare_dataset(small_raw, processed)
    before = {p.name: p.read_bytes() for p in processed.iterdir()}
    (small_raw / "train" / "extra").mkdir()
    shutil.copyfile(next((small_raw / "test").rglob("*.png")), small_raw / "train" / "extra" / "x.png")
    # A real SIGINT delivered while the core runs: it must surface as KeyboardInterrupt.
    script = textwrap.dedent(
        f"""
        import os, signal, kiln
        def progress(done, total):
            os.kill(os.getpid(), signal.SIGINT)
        try:
            kiln.prepare_dataset({str(small_raw)!r}, {str(processed)!r}, progress=progress)
        except KeyboardInterrupt:
            print("interrupted")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "interrupted", result.stderr
    assert {p.name: p.read_bytes() for p in processed.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


def test_core_api_reads_what_it_wrote(tmp_path: Path, small_raw: Path) -> None:
    manifest = kiln.prepare_dataset(small_raw, tmp_path / "p")
    images, labels = kiln.load_split(tmp_path / "p", "train")
    saved = torch.load(tmp_path / "p" / "train.pt", weights_only=True)
    assert torch.equal(images, saved["images"]) and torch.equal(labels, saved["labels"])
    assert kiln.read_manifest(tmp_path / "p").classes == manifest.classes
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kiln.read_manifest(tmp_path / "nothing-here")
    os.truncate(tmp_path / "p" / "train.pt", 100)
    with pytest.raises(ValueError, match="incomplete"):
        kiln.load_split(tmp_path / "p", "train")


def test_several_raw_dirs_combine_into_one_dataset(tmp_path: Path) -> None:
    """The template guide's RAW_DATA_DIRS: `raw_data_dir_path=[a,b]` on the real command line."""
    first = copy_sample(tmp_path / "set1", per_class=3, classes=2)
    second = copy_sample(tmp_path / "set2", per_class=2, classes=3)  # the same file names, plus a third class
    for raw in (first, second):
        (raw / "train" / sorted(p.name for p in (raw / "train").iterdir())[0] / "bad.png").write_text("not an image")
    processed = tmp_path / "processed"
    result = run_app(
        "process_data.py", f"raw_data_dir_path=[{first},{second}]", f"processed_data_dir_path={processed}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    manifest = kiln.read_manifest(processed)
    classes = sorted(p.name for p in (second / "train").iterdir())
    assert manifest.classes == classes
    train = manifest.split("train")
    assert train.count == 2 * 3 + 3 * 2  # nothing lost to the files of the same name
    assert train.class_counts == {classes[0]: 5, classes[1]: 5, classes[2]: 2}
    assert manifest.source_dir == f"{first.resolve()}:{second.resolve()}"
    bad = f"train/{classes[0]}/bad.png"
    assert [note.path for note in manifest.skipped] == [f"{first.resolve()}/{bad}", f"{second.resolve()}/{bad}"]
    images, labels = kiln.load_split(processed, "train")
    assert images.shape[0] == 12 and torch.bincount(labels).tolist() == [5, 5, 2]


def test_a_list_of_one_raw_dir_gives_the_single_dir_dataset(tmp_path: Path, small_raw: Path) -> None:
    prepare(small_raw, tmp_path / "single")
    prepare(f"[{small_raw}]", tmp_path / "list")
    for file in ("train.pt", "test.pt", "manifest.json"):
        assert (tmp_path / "single" / file).read_bytes() == (tmp_path / "list" / file).read_bytes(), file


def test_a_missing_dir_in_the_list_fails_naming_it(tmp_path: Path, small_raw: Path) -> None:
    missing = tmp_path / "no-such-dir"
    result = run_app("process_data.py", f"raw_data_dir_path=[{small_raw},{missing}]", cwd=tmp_path)
    assert result.returncode != 0
    assert f"raw data dir '{missing}' does not exist" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
