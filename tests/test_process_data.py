"""Data preparation: `kiln.processing.process_data(cfg)` on configs composed from
conf/process_data.yaml, and `python src/process_data.py` end to end for the command's contract (exit
codes, messages, log files, template-style overrides); the compiled core, real files."""

from __future__ import annotations

import io
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

    # 1.5 MB decoded: storage=auto keeps it decoded, in one shard per split.
    assert manifest["storage"] == "decoded"
    assert manifest["splits"]["train"]["shards"] == [
        {"file": "train-00000.pt", "count": 2000, "bytes": (tmp_path / "processed" / "train-00000.pt").stat().st_size}
    ]
    train = torch.load(tmp_path / "processed" / "train-00000.pt", weights_only=True)
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
    assert "Stored decoded in 2 shards" in info_log


def test_same_input_gives_identical_files(tmp_path: Path, small_raw: Path) -> None:
    prepare(small_raw, tmp_path / "a", "num_workers=1")
    prepare(small_raw, tmp_path / "b", "num_workers=2")
    for file in ("train-00000.pt", "test-00000.pt", "manifest.json"):
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

    train = torch.load(tmp_path / "processed" / "train-00000.pt", weights_only=True)
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
    before = (processed / "train-00000.pt").read_bytes()
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
    assert (processed / "train-00000.pt").read_bytes() == before


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
    test = torch.load(tmp_path / "p" / "test-00000.pt", weights_only=True)
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
    saved = torch.load(tmp_path / "p" / "train-00000.pt", weights_only=True)
    assert torch.equal(images, saved["images"]) and torch.equal(labels, saved["labels"])
    read = kiln.read_manifest(tmp_path / "p")
    assert read.classes == manifest.classes and read.storage == "decoded" and read.format_version == 2
    assert [(s.file, s.count) for s in read.split("train").shards] == [("train-00000.pt", 15)]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kiln.read_manifest(tmp_path / "nothing-here")
    os.truncate(tmp_path / "p" / "train-00000.pt", 100)
    with pytest.raises(ValueError, match="train-00000.pt': has 100 bytes.*incomplete"):
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
    for file in ("train-00000.pt", "test-00000.pt", "manifest.json"):
        assert (tmp_path / "single" / file).read_bytes() == (tmp_path / "list" / file).read_bytes(), file


def test_a_missing_dir_in_the_list_fails_naming_it(tmp_path: Path, small_raw: Path) -> None:
    missing = tmp_path / "no-such-dir"
    result = run_app("process_data.py", f"raw_data_dir_path=[{small_raw},{missing}]", cwd=tmp_path)
    assert result.returncode != 0
    assert f"raw data dir '{missing}' does not exist" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_encoded_storage_in_shards_gives_the_decoded_pixels(tmp_path: Path) -> None:
    raw = copy_sample(tmp_path / "raw", per_class=30, classes=4)
    processed = tmp_path / "encoded"
    result = run_app(
        "process_data.py",
        f"raw_data_dir_path={raw}",
        f"processed_data_dir_path={processed}",
        "storage=encoded",
        "shard_size_mb=0.01",
        f"log_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    manifest = read_manifest_json(processed)
    assert (manifest["storage"], manifest["encoding"]) == ("encoded", "png")
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 1 and sum(shard["count"] for shard in shards) == 120
    assert [shard["file"] for shard in shards] == [f"train-{i:05d}.pt" for i in range(len(shards))]
    # A shard is plain torch.load content: image i is data[offsets[i]:offsets[i + 1]], a PNG.
    first = torch.load(processed / shards[0]["file"], weights_only=True)
    assert first["offsets"][0] == 0 and first["offsets"][-1] == first["data"].numel() <= 0.01 * 2**20
    files = [
        f for c in sorted(p.name for p in (raw / "train").iterdir()) for f in sorted((raw / "train" / c).iterdir())
    ]
    png = first["data"][first["offsets"][1] : first["offsets"][2]].numpy().tobytes()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(Image.open(files[1])))
    info_log = (tmp_path / "logs" / "info.log").read_text(encoding="utf-8")
    assert f"Stored png-encoded in {len(shards) + len(manifest['splits']['test']['shards'])} shards" in info_log

    prepare(raw, tmp_path / "decoded", "storage=decoded", "shard_size_mb=0.05")
    assert len(kiln.read_manifest(tmp_path / "decoded").split("train").shards) == 2  # 66 images of 784 bytes each
    for split in ("train", "test"):
        encoded_images, encoded_labels = kiln.load_split(processed, split)
        decoded_images, decoded_labels = kiln.load_split(tmp_path / "decoded", split)
        assert torch.equal(encoded_images, decoded_images) and torch.equal(encoded_labels, decoded_labels)


def test_jpeg_storage_keeps_the_sample_close(tmp_path: Path, small_raw: Path) -> None:
    manifest = prepare(small_raw, tmp_path / "jpeg", "storage=encoded", "encoding=jpeg", "jpeg_quality=95")
    assert (manifest.storage, manifest.encoding) == ("encoded", "jpeg")
    prepare(small_raw, tmp_path / "decoded")
    lossy, _ = kiln.load_split(tmp_path / "jpeg", "train")
    exact, _ = kiln.load_split(tmp_path / "decoded", "train")
    assert (lossy.float() - exact.float()).abs().mean() < 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("storage=zip", "storage must be one of auto, decoded, encoded, got 'zip'"),
        ("encoding=webp", "encoding must be one of png, jpeg, original, got 'webp'"),
        ("jpeg_quality=101", "jpeg_quality must be a whole number in 1..100, got 101"),
        ("shard_size_mb=0", "shard_size_mb must be a number of MiB, above 0, got 0"),
        ("auto_decoded_max_mb=-1", "auto_decoded_max_mb must be a number of MiB, 0 or more, got -1"),
        ("shard_size_mb=0.0001", "shard_size_mb in conf/process_data.yaml) is 104 bytes, smaller than one image"),
    ],
)
def test_bad_storage_keys_fail_naming_the_key(tmp_path: Path, small_raw: Path, override: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare(small_raw, tmp_path / "p", override)
    assert not (tmp_path / "p").exists()


def test_killed_while_writing_shards_leaves_the_previous_dataset(tmp_path: Path, small_raw: Path) -> None:
    processed = tmp_path / "processed"
    kiln.prepare_dataset(small_raw, processed)
    before = {p.name: p.read_bytes() for p in processed.iterdir()}
    # SIGKILL once half the images are in shards (one image a shard): nothing runs to clean up.
    script = textwrap.dedent(
        f"""
        import os, signal, kiln
        def progress(done, total):
            if done >= total // 2:
                os.kill(os.getpid(), signal.SIGKILL)
        kiln.prepare_dataset({str(small_raw)!r}, {str(processed)!r}, shard_bytes=784, num_workers=1,
                             progress=progress)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    (staging,) = [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    assert any(p.suffix == ".pt" for p in staging.iterdir())  # killed with shards written
    assert {p.name: p.read_bytes() for p in processed.iterdir()} == before
    # The next run removes what the killed one left.
    kiln.prepare_dataset(small_raw, processed, shard_bytes=784)
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    assert len(kiln.read_manifest(processed).split("train").shards) == 15


def test_corrupt_shard_is_named_when_loading(tmp_path: Path, small_raw: Path) -> None:
    processed = tmp_path / "p"
    kiln.prepare_dataset(small_raw, processed, storage="encoded", shard_bytes=4000)
    shard = processed / kiln.read_manifest(processed).split("train").shards[1].file
    data = bytearray(shard.read_bytes())
    start = data.index(b"\x89PNG", 100)  # the first image's bytes, inside the data record
    data[start : start + 40] = bytes(40)
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"cannot decode shard '{re.escape(str(shard))}' \(sample 0 of \d+\)"):
        kiln.load_split(processed, "train")


# Peak memory of preparing a dataset ~15x the shard size, in a fresh process so the peak is its own.
MEMORY_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
import kiln

raw, out = Path(sys.argv[1]), Path(sys.argv[2])
rng = np.random.default_rng(0)
for split, count in (("train", 1000), ("test", 200)):
    for i in range(count):
        folder = raw / split / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")


def peak_kb():
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")


# Libraries, codecs and worker threads warmed up on a tiny dataset first: the peak then measures the data.
kiln.prepare_dataset(raw, out / "warm", image_size=(8, 8), shard_bytes=4096)
growth = {}
for storage in ("decoded", "encoded"):
    reset_peak()
    baseline = peak_kb()
    manifest = kiln.prepare_dataset(raw, out / storage, image_size=(128, 128), storage=storage, shard_bytes=4 << 20)
    growth[storage] = (peak_kb() - baseline) * 1024
print(json.dumps({"growth": growth, "shards": len(manifest.split("train").shards)}))
"""


def test_preparation_memory_is_bounded_by_a_few_shards_not_the_dataset(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "raw"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    dataset_bytes = 1200 * 3 * 128 * 128  # 59 MB decoded
    shard = 4 << 20
    # What preparation holds at once: the chunk being decoded (one shard's images), a copy of it when
    # files were skipped or the encoded shard's bytes, plus per-thread decode buffers and allocator slack.
    # 4 shards (16 MiB) bounds that; holding a whole split decoded, as format version 1 did, takes 48 MB.
    for storage, growth in report["growth"].items():
        assert growth < 4 * shard < dataset_bytes / 3, (storage, growth)
