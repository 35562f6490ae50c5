"""Hostile images (issue 18): size-claim and decompression bombs, and error text that is not UTF-8.

Every bomb is generated here. The real compiled core, the real CLIs and a real gunicorn server are
used: a bomb is a per-image error everywhere (never an exception for its batch), refused before
memory is reserved for its claimed size, and the other images get their answers.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import kiln
from conftest import REPO, SAMPLE, ServerProcess, copy_sample, run_app
from kiln.inference import load_predictor

GOOD = sorted((SAMPLE / "test" / "7_Sneaker").iterdir())[:4] + sorted((SAMPLE / "test" / "1_Trouser").iterdir())[:4]
PREP_BUDGET = 89478485
SERVING_BUDGET = 4096 * 4096

# --- the bombs --------------------------------------------------------------------------------------

ZERO_BLOCK = 16 << 20


def zeros_zlib(size: int) -> bytes:
    """A zlib stream of `size` zero bytes (a multiple of 16 MiB), built from one compressed block
    repeated: about 1 KB per MiB, without ever holding the inflated data."""
    assert size % ZERO_BLOCK == 0
    compressor = zlib.compressobj(9)
    segment = (compressor.compress(bytes(ZERO_BLOCK)) + compressor.flush(zlib.Z_FULL_FLUSH))[2:]
    adler = ((size % 65521) << 16) | 1  # Adler-32 of zeros: a stays 1, b is the length
    return b"\x78\xda" + segment * (size // ZERO_BLOCK) + b"\x03\x00" + struct.pack(">I", adler)


def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png(width: int, height: int, colour_type: int, data: bytes, depth: int = 8) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def size_claim(colour_type: int) -> bytes:
    """The issue's 69-byte PNG claiming 60000x60000 (gray 0, gray+alpha 4, RGB 2, RGBA 6)."""
    return png(60000, 60000, colour_type, zlib.compress(b"\0"))


def jpeg_claim(width: int = 32768, height: int = 32767) -> bytes:
    """A 1 KB JPEG whose frame header claims width x height."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def non_utf8_crc_error() -> bytes:
    """A sample PNG with a critical chunk whose type bytes are not ASCII, and a wrong CRC."""
    sample = GOOD[0].read_bytes()
    return sample[:33] + chunk(b"\xc1\xff\x80T", b"data", crc=0) + sample[33:]


@pytest.fixture(scope="module")
def bombs() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the per-image error kiln gives it under the default budget)."""
    claim = f"over max_image_pixels={PREP_BUDGET}"
    return {
        "png-60000-gray": (size_claim(0), f"PNG claims 60000x60000, {claim}"),
        "png-60000-gray-alpha": (size_claim(4), f"PNG claims 60000x60000, {claim}"),
        "png-60000-rgb": (size_claim(2), f"PNG claims 60000x60000, {claim}"),
        "png-60000-rgba": (size_claim(6), f"PNG claims 60000x60000, {claim}"),
        "jpeg-32768x32767": (jpeg_claim(), f"JPEG claims 32768x32767, {claim}"),
        # 400 KB inflating to 400 MB, claiming 20000x20000: refused from its header, never inflated.
        "deflate-over-budget": (png(20000, 20000, 0, zeros_zlib(384 << 20)), f"PNG claims 20000x20000, {claim}"),
        # 1 MB inflating to 1 GB behind a header claiming 1000x1000: inflation stops at the claimed size.
        "deflate-excess": (png(1000, 1000, 0, zeros_zlib(1 << 30)), "image data is longer than its header says"),
        "deflate-excess-16-bit": (
            png(1000, 1000, 0, zeros_zlib(1 << 30), depth=16),
            "image data is longer than its header says",
        ),
        "non-utf8-crc": (non_utf8_crc_error(), r"CRC mismatch in \xc1\xff\x80T chunk"),
        # Under the budget but taller than OpenCV reads: refused before OpenCV copies it to a temporary file
        # (Sun raster: magic, width 1, height 3813167, depth 24, length, type, no colour map).
        "sun-raster-tall": (
            b"\x59\xa6\x6a\x95" + struct.pack(">7I", 1, 3813167, 24, 80, 1, 0, 0) + bytes(16),
            "Sun raster claims 1x3813167, over OpenCV's limits (1048576 pixels per side, 2^30 in all)",
        ),
    }


# --- Predictor.predict_encoded -------------------------------------------------------------------


def test_each_bomb_is_a_per_image_error_and_the_batch_is_predicted(trained_checkpoint: Path, bombs) -> None:
    predictor = kiln.Predictor(trained_checkpoint)
    good = [file.read_bytes() for file in GOOD]
    alone, _ = predictor.predict_encoded(good)
    for name, (bomb, error) in bombs.items():
        started = time.monotonic()
        probabilities, errors = predictor.predict_encoded([good[0], good[1], bomb, *good[2:]])
        assert time.monotonic() - started < 5, name
        assert errors[:2] == [None, None] and errors[3:] == [None] * (len(good) - 2), (name, errors)
        assert isinstance(errors[2], str) and error in errors[2], (name, errors[2])
        assert errors[2].encode("utf-8").decode("utf-8") == errors[2]
        assert float(probabilities[2].abs().sum()) == 0.0
        kept = probabilities[[0, 1, *range(3, len(good) + 1)]]
        assert (kept - alone).abs().max() < 1e-5, name


def test_the_budget_is_the_predictor_s_setting(trained_checkpoint: Path) -> None:
    predictor = kiln.Predictor(trained_checkpoint)
    assert predictor.max_image_pixels == PREP_BUDGET
    image = GOOD[0].read_bytes()  # 28x28
    predictor.max_image_pixels = 28 * 28
    assert predictor.predict_encoded([image])[1] == [None]
    predictor.max_image_pixels = 28 * 28 - 1
    assert predictor.predict_encoded([image])[1] == ["PNG claims 28x28, over max_image_pixels=783"]
    with pytest.raises(ValueError, match="max_image_pixels must be at least 1, got 0"):
        predictor.max_image_pixels = 0


MEASURE = """
import resource, sys
from pathlib import Path
import kiln
sys.path.insert(0, {tests!r})
import test_hostile_images as t
predictor = kiln.Predictor({checkpoint!r})
good = [file.read_bytes() for file in t.GOOD]
predictor.predict_encoded(good)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for bomb in [t.size_claim(c) for c in (0, 4, 2, 6)] + [t.jpeg_claim()]:
    assert predictor.predict_encoded([bomb, *good])[1][0] is not None
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_kib(checkpoint: Path) -> tuple[int, int]:
    """Peak RSS (KiB) of a fresh process predicting good images, then after the size-claim bombs."""
    script = MEASURE.format(tests=str(REPO / "tests"), checkpoint=str(checkpoint))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    before, after = map(int, result.stdout.split())
    return before, after


def test_size_claims_allocate_nothing_for_their_claimed_size(trained_checkpoint: Path) -> None:
    # Before: 3.7 GB (gray), 7.1 GB (gray+alpha), MemoryError (RGB), OOM kill (RGBA), 6.4 GB (JPEG).
    before, after = peak_rss_kib(trained_checkpoint)
    assert after - before < 64 * 1024, f"peak RSS grew {(after - before) // 1024} MiB on the bombs"


def test_an_error_naming_a_path_that_is_not_utf8_reaches_python_readable(tmp_path: Path) -> None:
    raw = Path(os.fsdecode(bytes(tmp_path) + b"/raw-\xff\xfe"))  # an empty dir whose name is not UTF-8
    raw.mkdir()
    with pytest.raises(ValueError, match=r"raw-\\xff\\xfe"):  # was a UnicodeDecodeError
        kiln.prepare_dataset(raw, tmp_path / "processed")


# --- process_data.py and batch_inferencing.py ------------------------------------------------------


def test_process_data_skips_the_bombs_and_commits_the_rest(tmp_path: Path, bombs) -> None:
    raw = copy_sample(tmp_path / "raw", per_class=5, classes=2)
    trouser = next(p for p in (raw / "train").iterdir() if p.is_dir())
    for name, (bomb, _) in bombs.items():
        (trouser / f"{name}.png").write_bytes(bomb)
    out = tmp_path / "processed"
    result = run_app(
        "process_data.py", f"raw_data_dir_path={raw}", f"processed_data_dir_path={out}", cwd=tmp_path, timeout=300
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "Traceback" not in log and "UnicodeDecodeError" not in log
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    skipped = {Path(entry["path"]).stem: entry["reason"] for entry in manifest["skipped"]}
    for name, (_, error) in bombs.items():
        assert error in skipped[name], (name, skipped.get(name))
        assert name in log
    assert sum(split.count for split in kiln.read_manifest(out).splits) == 2 * 5 * 2  # every good image


def test_process_data_s_budget_is_a_config_key(tmp_path: Path) -> None:
    raw = copy_sample(tmp_path / "raw", per_class=2, classes=2)
    out = tmp_path / "processed"
    result = run_app(
        "process_data.py",
        f"raw_data_dir_path={raw}",
        f"processed_data_dir_path={out}",
        "image_size=[28,28]",
        "channels=1",
        "max_image_pixels=100",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "PNG claims 28x28, over max_image_pixels=100" in result.stdout + result.stderr
    zero = run_app("process_data.py", f"raw_data_dir_path={raw}", "max_image_pixels=0", cwd=tmp_path)
    assert zero.returncode == 1
    assert "max_image_pixels must be a whole number of pixels of at least 1" in zero.stdout + zero.stderr
    assert "Traceback" not in zero.stdout + zero.stderr


def test_batch_inference_classifies_the_other_images(tmp_path: Path, trained_checkpoint: Path, bombs) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for file in GOOD:
        (images / file.name).write_bytes(file.read_bytes())
    for name, (bomb, _) in bombs.items():
        (images / f"{name}.png").write_bytes(bomb)
    result = run_app(
        "batch_inferencing.py",
        f"inference.model_path={trained_checkpoint}",
        f"inference.input_data_dir={images}",
        "inference.batch_size=4",
        cwd=tmp_path,
        timeout=300,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    output = (tmp_path / "outputs" / "batch-infer-res.jsonl").read_text("utf-8")
    lines = [json.loads(line) for line in output.splitlines()]
    by_name = {Path(line["filepath"]).stem: line for line in lines}
    predictor = load_predictor(trained_checkpoint, no_cuda=True)
    probabilities, _ = predictor.predict_encoded([file.read_bytes() for file in GOOD])
    for file, row in zip(GOOD, probabilities, strict=True):
        assert by_name[file.stem]["prediction"] == predictor.classes[int(row.argmax())]
    for name, (_, error) in bombs.items():
        assert by_name[name]["prediction"] is None and error in by_name[name]["error"], by_name[name]


# --- the running server -----------------------------------------------------------------------------


class OneWorkerServer(ServerProcess):
    """gunicorn with one uvicorn worker, so the worker whose memory is measured is the one that answered."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        def command(port: int) -> list[str]:
            return [sys.executable, "-m", "gunicorn", "kiln_fastapi.main:APP", "-b", f"127.0.0.1:{port}"] + [
                "-w",
                "1",
                "-k",
                "uvicorn.workers.UvicornWorker",
                "--chdir",
                "src",
            ]

        super().__init__(root, "gunicorn-hostile", command, env=env, cwd=REPO)

    def worker_memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the worker process, from /proc."""
        import psutil

        (worker,) = psutil.Process(self.process.pid).children()
        status = Path(f"/proc/{worker.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory, trained_checkpoint: Path):
    root = tmp_path_factory.mktemp("hostile-server")
    server = OneWorkerServer(root, {"PRED_MODEL_PATH": str(trained_checkpoint), "PRED_MODEL_UUID": "hostile"})
    try:
        server.wait_healthy("/v2/health/ready", timeout=90)
        yield server
    finally:
        server.stop()


def predict(url: str, images: list[bytes]) -> tuple[int, dict]:
    body = json.dumps({"images": [{"id": i, "image": base64.b64encode(b).decode()} for i, b in enumerate(images)]})
    request = urllib.request.Request(f"{url}/api/v1/model/predict", data=body.encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_server_answers_bombs_4xx_and_good_requests_right_with_bounded_memory(
    hostile_server: OneWorkerServer, trained_checkpoint: Path, bombs
) -> None:
    good = [file.read_bytes() for file in GOOD]
    predictor = load_predictor(trained_checkpoint, no_cuda=True)
    probabilities, _ = predictor.predict_encoded(good)
    labels = [predictor.classes[int(row.argmax())] for row in probabilities]
    for _ in range(3):  # warm up the worker: its baseline includes a served batch
        assert predict(hostile_server.url, good)[0] == 200
    baseline = hostile_server.worker_memory_kib()

    requests = [("bomb", name, [bomb]) for name, (bomb, _) in bombs.items()] * 2
    requests += [("good", str(i), good) for i in range(len(requests))]
    requests.sort(key=lambda request: request[1])  # bombs and good requests interleaved

    def send(request):
        kind, name, images = request
        return kind, name, *predict(hostile_server.url, images)

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(send, requests))
    for kind, name, status, body in answers:
        if kind == "bomb":
            assert 400 <= status < 500, (name, status, body)
            (message,) = [item["msg"] for item in body["detail"]]
            assert bombs[name][1].replace(str(PREP_BUDGET), str(SERVING_BUDGET)) in message, (name, message)
        else:
            assert status == 200, (name, status, body)
            assert [item["prediction"] for item in body["data"]] == labels
    after = hostile_server.worker_memory_kib()
    hostile_server.process.poll()
    assert hostile_server.process.returncode is None, hostile_server.log()
    print(
        f"worker memory: baseline VmRSS {baseline['VmRSS'] // 1024} MiB (peak {baseline['VmHWM'] // 1024} MiB); "
        f"after {len(requests)} requests with {len(bombs) * 2} bombs: VmRSS {after['VmRSS'] // 1024} MiB, "
        f"peak VmHWM {after['VmHWM'] // 1024} MiB"
    )
    assert after["VmHWM"] - baseline["VmRSS"] < 400 * 1024, (baseline, after)
    assert after["VmRSS"] - baseline["VmRSS"] < 100 * 1024, (baseline, after)
