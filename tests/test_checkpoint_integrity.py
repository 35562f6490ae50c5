"""Damaged checkpoints and the temp files of killed runs, where users meet them: the real
batch_inferencing.py, train_model.py (resume), process_data.py and ``python -m kiln.data``.

Every damaged file is made here from a checkpoint kiln wrote; none is committed."""

from __future__ import annotations

import io
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import kiln
from conftest import run_app
from kiln.precision import load_predictor


def this_host() -> str:
    """The host part of kiln's temp file names."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())


def dead_pid() -> int:
    """The pid of a process that has exited."""
    return int(subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True).stdout)


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of a process that runs for the test's duration."""
    process = subprocess.Popen(["sleep", "600"])
    yield process.pid
    process.kill()
    process.wait()


def truncated(good: bytes) -> bytes:
    return good[: len(good) // 2]


def not_a_zip(good: bytes) -> bytes:
    return b"weights are on the shared drive\n"


def flipped_bit(good: Path) -> bytes:
    """The checkpoint with one bit flipped in the middle of fc1.weight's data."""
    weight = torch.load(good, weights_only=True)["model"]["state_dict"]["fc1.weight"]
    data = bytearray(good.read_bytes())
    start = bytes(data).find(weight.numpy().tobytes())
    assert start > 0
    data[start + weight.numel() * 2] ^= 0x10
    return bytes(data)


def edited(good: Path, change: Callable[[dict], None]) -> bytes:
    """The checkpoint changed in Python and saved with torch.save, as a user might."""
    saved = torch.load(good, weights_only=True)
    change(saved)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    return buffer.getvalue()


def nan_weight_without_checksums(good: Path) -> bytes:
    """A diverged model's checkpoint as kiln wrote them before checksums (nothing refused it then)."""

    def change(saved: dict) -> None:
        del saved["integrity"]
        saved["model"]["state_dict"]["fc1.weight"][5, 7] = float("nan")

    return edited(good, change)


def damaged(name: str, good: Path) -> bytes:
    return {
        "truncated": lambda: truncated(good.read_bytes()),
        "not_a_zip": lambda: not_a_zip(good.read_bytes()),
        "empty": lambda: b"",
        "flipped_bit": lambda: flipped_bit(good),
        "nan_weight": lambda: nan_weight_without_checksums(good),
        "no_model": lambda: edited(good, lambda saved: saved.pop("model")),
        "another_program": lambda: edited(good, lambda saved: saved.pop("format")),
    }[name]()


# What kiln says is wrong with each damaged file.
FAULTS = {
    "truncated": "truncated (zip central directory missing)",
    "not_a_zip": "not a zip archive as torch.save writes (it starts with bytes 77 65 69",
    "empty": "empty file (0 bytes)",
    "flipped_bit": "tensor 'model.state_dict.fc1.weight' does not match its checksum; the file is damaged",
    "nan_weight": "'fc1.weight' holds 1 NaN or infinite value(s) of 1179648",
    "no_model": "tensor 'model.state_dict.conv1.weight' is missing, though its checksums list it",
    "another_program": "not a kiln checkpoint (no 'format': 'kiln-checkpoint' entry)",
}


def assert_one_line_error(result: subprocess.CompletedProcess, path: Path, fault: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and "c10::" not in output and "INTERNAL ASSERT" not in output, output
    lines = [line for line in output.splitlines() if str(path) in line]
    assert len(lines) == 1 and fault in lines[0], output


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_batch_inference_refuses_a_damaged_checkpoint_in_one_line(
    tmp_path: Path, trained_checkpoint: Path, name: str
) -> None:
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(damaged(name, trained_checkpoint))
    result = run_app(
        "batch_inferencing.py", f"inference.model_path={bad}", f"inference.input_data_dir={tmp_path}", cwd=tmp_path
    )
    assert_one_line_error(result, bad, FAULTS[name])


@pytest.mark.parametrize("name", ["flipped_bit", "nan_weight", "truncated"])
def test_serving_s_loader_refuses_a_damaged_checkpoint_naming_it(
    tmp_path: Path, trained_checkpoint: Path, name: str
) -> None:
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(damaged(name, trained_checkpoint))
    with pytest.raises(ValueError) as refused:
        load_predictor(bad, no_cuda=True)
    assert str(refused.value).startswith(f"checkpoint '{bad}'")
    assert FAULTS[name] in str(refused.value) and "\n" not in str(refused.value)


def test_resume_from_a_damaged_checkpoint_fails_in_one_line_and_keeps_the_file(
    tmp_path: Path, processed_sample: Path, trained_checkpoint: Path
) -> None:
    checkpoint = tmp_path / "models" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(damaged("flipped_bit", trained_checkpoint))
    before = checkpoint.read_bytes()
    result = run_app(
        "train_model.py",
        f"data_dir_path={processed_sample}",
        f"artifact_dir_path={tmp_path / 'models'}",
        f"log_dir={tmp_path / 'logs'}",
        "setup_mlflow=false",
        "resume=true",
        "epochs=1",
        "train_limit=100",
        "test_limit=50",
        cwd=tmp_path,
    )
    assert_one_line_error(result, checkpoint, FAULTS["flipped_bit"])
    assert checkpoint.read_bytes() == before


LOAD_AND_REPORT_PEAK_MEMORY = textwrap.dedent(
    """
    import resource, sys
    import kiln

    try:
        kiln.Predictor(sys.argv[1])
    except ValueError as error:
        print(error)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """
)


def test_a_length_claim_in_the_pickle_is_refused_before_any_allocation(
    tmp_path: Path, trained_checkpoint: Path
) -> None:
    """data.pkl's "format" string claiming 4 GiB - 16: LibTorch's unpickler would zero-fill that much first."""
    data = trained_checkpoint.read_bytes()
    key = b"X\x06\x00\x00\x00format"
    assert key in data
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(data.replace(key, b"X\xf0\xff\xff\xff" + key[5:], 1))
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_REPORT_PEAK_MEMORY, str(bad)], capture_output=True, text=True, timeout=120
    )
    message, peak_mib = result.stdout.splitlines()
    assert message.startswith(f"checkpoint '{bad}' is damaged: data.pkl claims 4294967280 bytes at byte ")
    assert int(peak_mib) < 1024, result.stdout


def test_a_huge_claimed_model_size_is_refused_before_the_model_is_built(
    tmp_path: Path, trained_checkpoint: Path
) -> None:
    """model.height/width of 4096: building that mnist_cnn (an fc1 of 137 GB) came before the shape check."""

    def claim_4096(saved: dict) -> None:
        saved["model"].update(height=4096, width=4096)
        saved.pop("transform")  # as in checkpoints written before kiln recorded it

    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(edited(trained_checkpoint, claim_4096))
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_REPORT_PEAK_MEMORY, str(bad)], capture_output=True, text=True, timeout=120
    )
    message, peak_mib = result.stdout.splitlines()
    assert message == (
        f"checkpoint '{bad}': mnist_cnn's fc1 for 4096x4096 images ('model.height' x 'model.width') reads "
        "267911424 values, but 'model.state_dict.fc1.weight' has shape [128, 9216]"
    )
    assert int(peak_mib) < 1024, result.stdout


def test_resuming_with_a_missing_optimizer_entry_names_the_file_and_the_entry(
    tmp_path: Path, processed_sample: Path, trained_checkpoint: Path
) -> None:
    """It was an IndexError from inside the optimizer ("Argument passed to at() was not in the map")."""

    def drop_square_avg(saved: dict) -> None:
        del saved["optimizer"]["state"][0]["square_avg"]
        saved.pop("integrity")

    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(edited(trained_checkpoint, drop_square_avg))
    trainer = kiln.Trainer(processed_sample, train_limit=100, test_limit=50)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint '{bad}': has no 'optimizer.state.0.square_avg' entry")):
        trainer.load_checkpoint(bad)


def test_checkpoints_written_before_checksums_still_load(tmp_path: Path, trained_checkpoint: Path) -> None:
    old = tmp_path / "checkpoint.pt"
    old.write_bytes(edited(trained_checkpoint, lambda saved: saved.pop("integrity")))
    images = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    assert torch.equal(kiln.Predictor(old).predict(images), kiln.Predictor(trained_checkpoint).predict(images))


def test_a_checkpoint_re_saved_by_torch_save_still_verifies(tmp_path: Path, trained_checkpoint: Path) -> None:
    resaved = tmp_path / "checkpoint.pt"
    resaved.write_bytes(edited(trained_checkpoint, lambda saved: None))
    assert kiln.Predictor(resaved).epoch == kiln.Predictor(trained_checkpoint).epoch


def test_every_checkpoint_carries_a_checksum_of_each_tensor(trained_checkpoint: Path) -> None:
    saved = torch.load(trained_checkpoint, weights_only=True)
    integrity = saved["integrity"]
    assert integrity["algorithm"] == "crc32"
    assert "model.state_dict.fc1.weight" in integrity["tensors"]
    assert "optimizer.state.0.square_avg" in integrity["tensors"] and "rng.shuffle" in integrity["tensors"]


SAVE_FOREVER = textwrap.dedent(
    """
    import sys
    import kiln

    trainer = kiln.Trainer(sys.argv[1], train_limit=100, test_limit=50, seed=5)
    print("ready", flush=True)
    while True:
        trainer.save_checkpoint(sys.argv[2])
    """
)


def kill_mid_save(processed: Path, checkpoint: Path) -> Path:
    """SIGKILL a process while it writes ``checkpoint``; returns the temp file it left."""
    for _ in range(20):
        saver = subprocess.Popen(
            [sys.executable, "-c", SAVE_FOREVER, str(processed), str(checkpoint)], stdout=subprocess.PIPE, text=True
        )
        assert saver.stdout is not None and saver.stdout.readline() == "ready\n"
        temp = checkpoint.with_name(f".{checkpoint.name}.tmp-{this_host()}-{saver.pid}")
        deadline = time.monotonic() + 30
        while not temp.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        saver.stdout.close()
        if temp.exists():
            return temp
    raise AssertionError("no save was caught in progress")


def test_the_next_training_run_removes_the_temp_file_of_a_killed_save_but_not_a_live_one(
    tmp_path: Path, processed_sample: Path, live_pid: int
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    checkpoint = models / "checkpoint.pt"
    stale = kill_mid_save(processed_sample, checkpoint)
    live = models / f".checkpoint.pt.tmp-{this_host()}-{live_pid}"
    other_host = models / f".checkpoint.pt.tmp-another-machine-{dead_pid()}"
    live.write_bytes(b"being written")
    other_host.write_bytes(b"being written on another machine sharing the volume")

    result = run_app(
        "train_model.py",
        f"data_dir_path={processed_sample}",
        f"artifact_dir_path={models}",
        f"log_dir={tmp_path / 'logs'}",
        "setup_mlflow=false",
        "epochs=1",
        "train_limit=100",
        "test_limit=50",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not stale.exists()
    assert live.exists() and other_host.exists()
    assert kiln.Predictor(checkpoint).epoch == 1


def test_process_data_removes_staging_dirs_of_killed_runs_only(tmp_path: Path, small_raw: Path, live_pid: int) -> None:
    processed = tmp_path / "processed"
    stale = tmp_path / f".processed.staging-{this_host()}-{dead_pid()}-0"
    live = tmp_path / f".processed.staging-{this_host()}-{live_pid}-0"
    other_host = tmp_path / f".processed.staging-another-machine-{dead_pid()}-0"
    for staging in (stale, live, other_host):
        staging.mkdir()
        (staging / "train.pt").write_bytes(b"partial")
    result = run_app(
        "process_data.py",
        f"raw_data_dir_path={small_raw}",
        f"processed_data_dir_path={processed}",
        f"log_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not stale.exists()
    assert live.exists() and other_host.exists()
    assert (processed / "manifest.json").is_file()


def idx_file(path: Path, array: np.ndarray) -> None:
    path.write_bytes(
        struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    )


def test_idx_conversion_removes_staging_trees_of_killed_runs_only(tmp_path: Path, live_pid: int) -> None:
    idx = tmp_path / "idx"
    idx.mkdir()
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        idx_file(idx / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (20, 4, 4), dtype=np.uint8))
        idx_file(idx / f"{prefix}-labels-idx1-ubyte", np.arange(20, dtype=np.uint8) % 10)
    out = tmp_path / "raw"
    stale = tmp_path / f"raw.tmp-{this_host()}-{dead_pid()}"
    live = tmp_path / f"raw.tmp-{this_host()}-{live_pid}"
    other_host = tmp_path / f"raw.tmp-another-machine-{dead_pid()}"
    for tree in (stale, live, other_host):
        (tree / "train").mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, "-m", "kiln.data", "from-idx", "--idx-dir", str(idx), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not stale.exists()
    assert live.exists() and other_host.exists()
    assert len(list((out / "train").iterdir())) == 10  # a class folder each
