"""The model server as users run it: real gunicorn with uvicorn workers on a loopback port, over HTTP."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

import kiln
from conftest import REPO, SAMPLE, ServerProcess
from kiln.inference import load_predictor

# Hypothesis reports a falsifying example through libcst, whose import warns (mypy_extensions.TypedDict is
# deprecated); under pytest's warnings-as-errors that warning replaced the report with an INTERNALERROR.
# Imported here once, quietly (for the schemathesis test and test_serving_hostile.py's), the report
# shows the example.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401

IMAGES = sorted((SAMPLE / "test" / "7_Sneaker").iterdir())[:8] + sorted((SAMPLE / "test" / "1_Trouser").iterdir())[:8]


class ModelServer(ServerProcess):
    """`gunicorn kiln_fastapi.main:APP ... -k uvicorn.workers.UvicornWorker --chdir src` on a free port."""

    def __init__(self, root: Path, env: dict[str, str], workers: int = 2) -> None:
        def command(port: int) -> list[str]:
            return [sys.executable, "-m", "gunicorn", "kiln_fastapi.main:APP", "-b", f"127.0.0.1:{port}"] + [
                "-w",
                str(workers),
                "-k",
                "uvicorn.workers.UvicornWorker",
                "--chdir",
                "src",
            ]

        super().__init__(root, "gunicorn", command, env=env, cwd=REPO)

    def wait_ready(self, timeout: float = 90) -> None:
        self.wait_healthy("/v2/health/ready", timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, trained_checkpoint: Path):
    root = tmp_path_factory.mktemp("server")
    running = ModelServer(root, {"PRED_MODEL_PATH": str(trained_checkpoint), "PRED_MODEL_UUID": "local-test-model"})
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def call(url: str, body: bytes | None = None, content_type: str = "application/json", method: str | None = None):
    """(status, parsed JSON body) of one HTTP request."""
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def json_batch(files: list[Path]) -> bytes:
    images = [{"id": index, "image": base64.b64encode(file.read_bytes()).decode()} for index, file in enumerate(files)]
    return json.dumps({"images": images}).encode()


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "kilnboundary7d1f"
    parts = []
    for name, data in files:
        header = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        parts.append(header.encode() + b"Content-Type: image/png\r\n\r\n" + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def expected(checkpoint: Path, files: list[Path]):
    """The labels and probabilities of the server's own numerics (precision auto, as the server)."""
    predictor = load_predictor(checkpoint, no_cuda=True)
    probabilities, errors = predictor.predict_encoded([file.read_bytes() for file in files])
    assert errors == [None] * len(files)
    return [predictor.classes[int(row.argmax())] for row in probabilities], probabilities


def test_predict_json_batch_gives_the_model_s_answers(server: ModelServer, trained_checkpoint: Path) -> None:
    status, body = call(f"{server.url}/api/v1/model/predict", json_batch(IMAGES))
    assert status == 200, body
    labels, probabilities = expected(trained_checkpoint, IMAGES)
    assert [item["id"] for item in body["data"]] == list(range(len(IMAGES)))
    assert [item["prediction"] for item in body["data"]] == labels
    for item, row in zip(body["data"], probabilities, strict=True):
        # bf16 results may differ in the last bits with the batch the server formed from concurrent requests.
        assert item["probability"] == pytest.approx(float(row.max()), abs=2e-3)
        assert list(item["probabilities"]) == kiln.Predictor(trained_checkpoint).classes
        assert sum(item["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_predict_multipart_upload_uses_file_names_as_ids(server: ModelServer, trained_checkpoint: Path) -> None:
    body, content_type = multipart([(file.name, file.read_bytes()) for file in IMAGES[:3]])
    status, answer = call(f"{server.url}/api/v1/model/predict", body, content_type)
    assert status == 200, answer
    assert [item["id"] for item in answer["data"]] == [file.name for file in IMAGES[:3]]
    assert [item["prediction"] for item in answer["data"]] == expected(trained_checkpoint, IMAGES[:3])[0]


def test_images_of_another_size_or_colour_are_converted_not_refused(
    server: ModelServer, trained_checkpoint: Path
) -> None:
    import io

    from PIL import Image

    with Image.open(IMAGES[0]) as image:
        buffer = io.BytesIO()
        image.convert("RGB").resize((56, 40)).save(buffer, format="JPEG")
    body, content_type = multipart([("big-colour.jpg", buffer.getvalue())])
    status, answer = call(f"{server.url}/api/v1/model/predict", body, content_type)
    assert status == 200, answer
    assert answer["data"][0]["prediction"] in kiln.Predictor(trained_checkpoint).classes


def test_concurrent_clients_each_get_their_own_answers(server: ModelServer, trained_checkpoint: Path) -> None:
    labels, _ = expected(trained_checkpoint, IMAGES)

    def client(index: int) -> list[str]:
        answers = []
        for round_ in range(4):
            file = IMAGES[(index + round_) % len(IMAGES)]
            status, body = call(f"{server.url}/api/v1/model/predict", json_batch([file]))
            assert status == 200, body
            answers.append((IMAGES.index(file), body["data"][0]["prediction"]))
        return answers

    with ThreadPoolExecutor(16) as pool:
        for answers in pool.map(client, range(16)):
            for index, prediction in answers:
                assert prediction == labels[index]


def test_version_health_and_docs(server: ModelServer) -> None:
    status, body = call(f"{server.url}/api/v1/model/version")
    assert status == 200
    assert body["data"]["model_uuid"] == "local-test-model"
    assert body["data"]["model_name"] == "mnist_cnn"
    assert call(f"{server.url}/api/v1/health") == (200, {"status": "ok"})
    assert call(f"{server.url}/v2/health/live") == (200, {"live": True})
    with urllib.request.urlopen(f"{server.url}/docs", timeout=10) as response:
        assert response.status == 200 and b"swagger" in response.read().lower()


def test_open_inference_protocol_routes(server: ModelServer, trained_checkpoint: Path) -> None:
    status, metadata = call(f"{server.url}/v2/models/kiln")
    assert status == 200
    assert {"name": "images", "datatype": "UINT8", "shape": [-1, 1, 28, 28]} in metadata["inputs"]
    assert call(f"{server.url}/v2/models/kiln/ready") == (200, {"ready": True})
    assert call(f"{server.url}/v2/models/other")[0] == 404

    import torch

    labels, probabilities = expected(trained_checkpoint, IMAGES[:2])
    encoded = {
        "id": "req-1",
        "inputs": [
            {
                "name": "images",
                "shape": [2],
                "datatype": "BYTES",
                "data": [base64.b64encode(file.read_bytes()).decode() for file in IMAGES[:2]],
            }
        ],
    }
    status, answer = call(f"{server.url}/v2/models/kiln/infer", json.dumps(encoded).encode())
    assert status == 200, answer
    outputs = {output["name"]: output for output in answer["outputs"]}
    assert answer["id"] == "req-1"
    assert outputs["prediction"]["data"] == labels
    assert outputs["probabilities"]["shape"] == [2, 10]
    assert torch.allclose(torch.tensor(outputs["probabilities"]["data"]).view(2, 10), probabilities, atol=2e-3)


def test_uint8_tensor_input_matches_encoded_input(server: ModelServer, processed_sample: Path) -> None:
    images, _ = kiln.load_split(processed_sample, "test")
    request = {
        "inputs": [
            {"name": "images", "shape": [3, 1, 28, 28], "datatype": "UINT8", "data": images[:3].reshape(-1).tolist()}
        ]
    }
    status, answer = call(f"{server.url}/v2/models/kiln/infer", json.dumps(request).encode())
    assert status == 200, answer
    assert len(answer["outputs"][1]["data"]) == 3


PNG = IMAGES[0].read_bytes()
BAD_REQUESTS = [
    ("/api/v1/model/predict", b"{not json", "application/json", 422),
    ("/api/v1/model/predict", b'{"images": []}', "application/json", 422),
    ("/api/v1/model/predict", b'{"images": [{"id": 1}]}', "application/json", 422),
    ("/api/v1/model/predict", b'{"images": [{"id": 1, "image": "###"}]}', "application/json", 422),
    (
        "/api/v1/model/predict",
        json.dumps({"images": [{"id": 1, "image": base64.b64encode(b"text").decode()}]}).encode(),
        "application/json",
        422,
    ),
    (
        "/api/v1/model/predict",
        json.dumps({"images": [{"id": 1, "image": base64.b64encode(PNG[:60]).decode()}]}).encode(),
        "application/json",
        422,
    ),
    ("/api/v1/model/predict", json_batch([IMAGES[0]] * 300), "application/json", 413),
    ("/api/v1/model/predict", *multipart([("a.png", IMAGES[0].read_bytes())] * 300), 413),
    ("/api/v1/model/predict", b"\x00" * 64, "application/octet-stream", 415),
    ("/api/v1/model/predict", b"--x\r\nbroken", "multipart/form-data; boundary=x", 422),
    (
        "/v2/models/kiln/infer",
        b'{"inputs": [{"name": "images", "shape": [1, 1, 5, 5], "datatype": "UINT8", "data": [0]}]}',
        "application/json",
        422,
    ),
    (
        "/v2/models/kiln/infer",
        b'{"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [300]}]}',
        "application/json",
        422,
    ),
    (
        "/v2/models/kiln/infer",
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1.5]}]}',
        "application/json",
        422,
    ),
]


@pytest.mark.parametrize(("path", "body", "content_type", "status"), BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_stays_up(
    server: ModelServer, path: str, body: bytes, content_type: str, status: int
) -> None:
    got, answer = call(f"{server.url}{path}", body, content_type)
    assert got == status, answer
    assert answer["detail"]
    assert call(f"{server.url}/v2/health/ready") == (200, {"ready": True})


def test_oversized_body_is_refused_before_it_is_read(server: ModelServer) -> None:
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        # Declares 17 MiB but sends only the headers: the answer must not wait for the body.
        connection.sendall(
            b"POST /api/v1/model/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {17 * 1024 * 1024}\r\n\r\n".encode()
        )
        response = b""
        while b"MAX_REQUEST_BYTES" not in response and (chunk := connection.recv(65536)):
            response += chunk
        response = response.decode()
    assert response.startswith("HTTP/1.1 413")
    assert "MAX_REQUEST_BYTES" in response
    assert call(f"{server.url}/v2/health/ready") == (200, {"ready": True})


# "no run above": the guide's PRED_MODEL_PATH form, models/<run id>/artifacts/model/data/model, where no
# run was downloaded.
@pytest.mark.parametrize("problem", ["missing", "corrupt", "unset", "no run above"])
def test_a_server_without_a_usable_model_refuses_to_start(tmp_path: Path, problem: str) -> None:
    model = tmp_path / "checkpoint.pt"
    if problem == "corrupt":
        model.write_bytes(b"not a checkpoint at all")
    if problem == "no run above":
        (tmp_path / "models").mkdir()
        model = tmp_path / "models" / "0123456789abcdef" / "artifacts" / "model" / "data" / "model"
    env = {"PRED_MODEL_PATH": str(model) if problem != "unset" else "", "PRED_MODEL_UUID": ""}
    running = ModelServer(tmp_path, env, workers=1)
    try:
        returncode = running.process.wait(timeout=90)
    finally:
        running.stop()
    assert returncode != 0
    log = running.log_path.read_text()
    assert "kiln server not started" in log
    assert (str(model) if problem != "unset" else "PRED_MODEL_PATH") in log
    if problem == "no run above":
        assert "checkpoint/checkpoint.pt" in log  # where it looked


def test_server_downloads_the_model_of_pred_model_uuid(tmp_path: Path, mlflow_server: str, tracked_run: str) -> None:
    env = {
        "PRED_MODEL_UUID": tracked_run,
        "PRED_MODEL_PATH": "",
        "MLFLOW_TRACKING_URI": mlflow_server,
        "MODELS_DIR": str(tmp_path / "models"),
    }
    running = ModelServer(tmp_path, env, workers=1)
    try:
        running.wait_ready()
        status, body = call(f"{running.url}/api/v1/model/version")
        assert status == 200 and body["data"]["model_uuid"] == tracked_run
        assert (tmp_path / "models" / tracked_run / "checkpoint" / "checkpoint.pt").is_file()
        assert call(f"{running.url}/api/v1/model/predict", json_batch(IMAGES[:1]))[0] == 200
    finally:
        running.stop()


@pytest.mark.parametrize("download", ["kiln.models download", "mlflow artifacts download"])
def test_server_finds_the_run_from_the_guides_pred_model_path(
    tmp_path: Path, mlflow_server: str, tracked_run: str, download: str
) -> None:
    """The guide's `export PRED_MODEL_PATH="$PWD/models/$PRED_MODEL_UUID/artifacts/model/data/model"`
    after downloading the run: kiln's way (models/<run id>/checkpoint/...) or a copy of the run's
    artifact-store folder, as the guide's `gsutil cp -r` makes (models/<run id>/artifacts/checkpoint/...)."""
    models = tmp_path / "models"
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    if download == "kiln.models download":
        command = ["-m", "kiln.models", "download", tracked_run, "--dst", str(models)]
    else:
        command = ["-m", "mlflow", "artifacts", "download", "--run-id", tracked_run]
        command += ["--dst-path", str(models / tracked_run / "artifacts")]
    done = subprocess.run([sys.executable, *command], env={**os.environ, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    guide_path = models / tracked_run / "artifacts" / "model" / "data" / "model"
    running = ModelServer(tmp_path, {"PRED_MODEL_UUID": tracked_run, "PRED_MODEL_PATH": str(guide_path)}, workers=1)
    try:
        running.wait_ready()
        status, body = call(f"{running.url}/api/v1/model/version")
        assert status == 200 and body["data"]["model_uuid"] == tracked_run
        status, body = call(f"{running.url}/api/v1/model/predict", json_batch(IMAGES[:2]))
        assert status == 200 and len(body["data"]) == 2
        assert "is inside a run's download" in running.log()
    finally:
        running.stop()


@pytest.fixture(scope="module")
def served_schema(server: ModelServer):
    return schemathesis.openapi.from_url(f"{server.url}/api/v1/openapi.json")


api_schema = schemathesis.pytest.from_fixture("served_schema")


@api_schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_spec_under_fuzzing(case) -> None:
    # No 5xx, and every answer (status, content type, headers, body) is one the spec documents. Not
    # "schema-valid data is accepted": a schema cannot say "these base64 bytes are a PNG", and
    # well-formed requests with undecodable images rightly get a 422.
    case.call_and_validate(
        checks=[
            checks.not_a_server_error,
            checks.status_code_conformance,
            checks.content_type_conformance,
            checks.response_schema_conformance,
            checks.response_headers_conformance,
        ]
    )
