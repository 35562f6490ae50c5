"""The Open Inference Protocol's binary tensor data extension on the real server, with NVIDIA's tritonclient."""

from __future__ import annotations

import base64
import gzip
import json
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

import kiln
from test_serving import IMAGES, ModelServer, call, expected


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, trained_checkpoint: Path):
    root = tmp_path_factory.mktemp("binary-server")
    running = ModelServer(root, {"PRED_MODEL_PATH": str(trained_checkpoint), "PRED_MODEL_UUID": "run-7"}, workers=1)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture
def client(server: ModelServer):
    connection = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def pixels(processed_sample: Path) -> np.ndarray:
    images, _ = kiln.load_split(processed_sample, "test")
    return images[:5].numpy()


def json_route(server: ModelServer, pixels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(labels, probabilities) of the same pixels through the all-JSON form of the route."""
    request = {
        "inputs": [
            {"name": "images", "shape": list(pixels.shape), "datatype": "UINT8", "data": pixels.ravel().tolist()}
        ]
    }
    status, answer = call(f"{server.url}/v2/models/kiln/infer", json.dumps(request).encode())
    assert status == 200, answer
    outputs = {output["name"]: output for output in answer["outputs"]}
    probabilities = np.array(outputs["probabilities"]["data"], dtype=np.float32).reshape(
        outputs["probabilities"]["shape"]
    )
    return outputs["prediction"]["data"], probabilities


def test_tritonclient_defaults_give_the_json_route_s_answers(
    client: triton.InferenceServerClient, server: ModelServer, pixels: np.ndarray
) -> None:
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    tensor = triton.InferInput("images", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)  # binary_data=True: the pixels follow the JSON
    result = client.infer("kiln", [tensor])  # no outputs named: every output comes back binary
    outputs = {output["name"]: output for output in result.get_response()["outputs"]}
    assert "data" not in outputs["probabilities"] and outputs["probabilities"]["parameters"]["binary_data_size"] == 200
    labels, probabilities = json_route(server, pixels)
    assert [label.decode() for label in result.as_numpy("prediction")] == labels
    assert result.as_numpy("probabilities").dtype == np.float32
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, atol=2e-3)


def test_tritonclient_sends_image_files_as_binary_bytes_elements(
    client: triton.InferenceServerClient, trained_checkpoint: Path
) -> None:
    files = IMAGES[6:11]
    tensor = triton.InferInput("images", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array([file.read_bytes() for file in files], dtype=np.object_))
    outputs = [
        triton.InferRequestedOutput("prediction"),
        triton.InferRequestedOutput("probabilities", binary_data=False),
    ]
    result = client.infer("kiln", [tensor], outputs=outputs, request_id="batch-7")
    response = result.get_response()
    assert response["id"] == "batch-7"
    assert [output["name"] for output in response["outputs"]] == ["prediction", "probabilities"]
    assert "data" in response["outputs"][1] and "parameters" not in response["outputs"][1]
    labels, probabilities = expected(trained_checkpoint, files)
    assert [label.decode() for label in result.as_numpy("prediction")] == labels
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities.numpy(), atol=2e-3)


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_tritonclient_compressed_requests(
    client: triton.InferenceServerClient, server: ModelServer, pixels: np.ndarray, compression: str
) -> None:
    tensor = triton.InferInput("images", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    result = client.infer("kiln", [tensor], request_compression_algorithm=compression)
    assert [label.decode() for label in result.as_numpy("prediction")] == json_route(server, pixels)[0]


def test_binary_output_of_a_json_request_is_the_documented_layout(
    server: ModelServer, trained_checkpoint: Path
) -> None:
    """Without tritonclient: the raw answer's headers, JSON header and bytes, as the extension lays them out."""
    files = IMAGES[:2]
    request = {
        "parameters": {"binary_data_output": True},
        "inputs": [
            {
                "name": "images",
                "shape": [2],
                "datatype": "BYTES",
                "data": [base64.b64encode(file.read_bytes()).decode() for file in files],
            }
        ],
        "outputs": [{"name": "prediction"}, {"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    with urllib.request.urlopen(
        urllib.request.Request(f"{server.url}/v2/models/kiln/infer", data=json.dumps(request).encode()), timeout=60
    ) as response:
        assert response.headers["Content-Type"] == "application/octet-stream"
        header_length = int(response.headers["Inference-Header-Content-Length"])
        body = response.read()
    header = json.loads(body[:header_length])
    prediction, probabilities = header["outputs"]
    labels, expected_probabilities = expected(trained_checkpoint, files)
    tail = body[header_length:]
    assert len(tail) == prediction["parameters"]["binary_data_size"] + probabilities["parameters"]["binary_data_size"]
    elements, offset = [], 0
    while offset < prediction["parameters"]["binary_data_size"]:
        (size,) = struct.unpack_from("<I", tail, offset)
        elements.append(tail[offset + 4 : offset + 4 + size].decode())
        offset += 4 + size
    assert elements == labels
    values = np.frombuffer(tail[offset:], dtype="<f4").reshape(probabilities["shape"])
    np.testing.assert_allclose(values, expected_probabilities.numpy(), atol=2e-3)


def raw_infer(server: ModelServer, header: dict | bytes, tail: bytes = b"", headers: dict[str, str] | None = None):
    """(status, error answer) of a hand-built request: JSON header, then `tail`; the length header is set
    from the JSON unless `headers` gives one."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    all_headers = {"Inference-Header-Content-Length": str(len(encoded))} if tail else {}
    all_headers.update(headers or {})
    request = urllib.request.Request(f"{server.url}/v2/models/kiln/infer", data=encoded + tail, headers=all_headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def uint8(size: int | None, shape: list[int] | None = None, **extra) -> dict:
    parameters = {} if size is None else {"binary_data_size": size}
    tensor = {"name": "images", "shape": shape or [1, 1, 28, 28], "datatype": "UINT8", "parameters": parameters}
    return {"inputs": [{**tensor, **extra}]}


def bytes_input(size: int, count: int = 1) -> dict:
    return {
        "inputs": [{"name": "images", "shape": [count], "datatype": "BYTES", "parameters": {"binary_data_size": size}}]
    }


PNG = IMAGES[0].read_bytes()
ELEMENT = struct.pack("<I", len(PNG)) + PNG
MALFORMED = {
    "header length past the body": (
        uint8(784),
        b"\0" * 784,
        {"Inference-Header-Content-Length": "99999"},
        400,
        "Inference-Header-Content-Length is 99999, but the body has",
    ),
    "header length not a number": (
        uint8(784),
        b"\0" * 784,
        {"Inference-Header-Content-Length": "12abc"},
        400,
        "must be the JSON header's length in bytes",
    ),
    "header length cuts the JSON": (
        uint8(784),
        b"\0" * 784,
        {"Inference-Header-Content-Length": "10"},
        422,
        "Invalid JSON",
    ),
    "binary_data_size past the bytes sent": (
        uint8(784),
        b"\0" * 700,
        {},
        400,
        "binary_data_size 784, but only 700 bytes of binary data follow",
    ),
    "bytes that belong to no input": (uint8(784), b"\0" * 790, {}, 400, "6 bytes after the JSON"),
    "missing binary data": (uint8(784), b"", {}, 400, "no Inference-Header-Content-Length header"),
    "neither data nor binary data": (uint8(None), b"", {}, 422, "has no data"),
    "both data and binary data": (uint8(784, data=[0] * 784), b"\0" * 784, {}, 422, "both"),
    "UINT8 size not matching the shape": (uint8(700), b"\0" * 700, {}, 422, "needs 784 bytes of binary data"),
    "UINT8 size not matching the batch": (uint8(784, [2, 1, 28, 28]), b"\0" * 784, {}, 422, "needs 1568 bytes"),
    "binary_data_size negative": (uint8(-1), b"\0", {}, 422, "binary_data_size"),
    "binary_data_size not an integer": (uint8("784"), b"\0" * 784, {}, 422, "binary_data_size"),
    "BYTES element past the end": (
        bytes_input(len(ELEMENT) - 5),
        ELEMENT[:-5],
        {},
        422,
        f"element 0 has a length of {len(PNG)} bytes, but only {len(PNG) - 5}",
    ),
    "BYTES length cut short": (
        bytes_input(len(ELEMENT) + 2),
        ELEMENT + b"\1\0",
        {},
        422,
        "ends inside the 4-byte length of element 1",
    ),
    "BYTES count not matching the shape": (
        bytes_input(2 * len(ELEMENT), 3),
        ELEMENT * 2,
        {},
        422,
        "must have shape [2]",
    ),
    "BYTES empty element": (bytes_input(4 + len(ELEMENT), 2), b"\0\0\0\0" + ELEMENT, {}, 422, "the image is empty"),
    "BYTES undecodable element": (
        bytes_input(len(ELEMENT) + 8, 2),
        ELEMENT + struct.pack("<I", 4) + b"junk",
        {},
        422,
        "inputs.0.data.1: not a decodable image",
    ),
    "binary_data not a boolean": (
        {**uint8(784), "outputs": [{"name": "prediction", "parameters": {"binary_data": 2}}]},
        b"\0" * 784,
        {},
        422,
        "binary_data",
    ),
    "an output the model has not": (
        {**uint8(784), "outputs": [{"name": "logits"}]},
        b"\0" * 784,
        {},
        422,
        "outputs.0.name",
    ),
    "unsupported Content-Encoding": (uint8(784), b"\0" * 784, {"Content-Encoding": "br"}, 415, "'br' is not supported"),
}


@pytest.mark.parametrize(("header", "tail", "headers", "status", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_binary_requests_get_a_4xx_naming_what_is_wrong(
    server: ModelServer, header: dict, tail: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    got, answer = raw_infer(server, header, tail, headers)
    assert got == status, answer
    assert message in answer["error"], answer
    assert answer["detail"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bodies_are_bounded_and_checked(server: ModelServer, encoding: str) -> None:
    compress = gzip.compress if encoding == "gzip" else zlib.compress
    bomb = compress(b'{"inputs": [' + b" " * (40 * 1024 * 1024) + b"]}")  # 40 MiB of JSON in ~40 KB
    status, answer = raw_infer(server, bomb, headers={"Content-Encoding": encoding})
    assert status == 413 and "MAX_REQUEST_BYTES" in answer["error"], answer
    status, answer = raw_infer(
        server, compress(json.dumps(uint8(None)).encode())[:-6], headers={"Content-Encoding": encoding}
    )
    assert status == 400 and encoding in answer["error"], answer
    assert call(f"{server.url}/v2/health/ready") == (200, {"ready": True})


def test_tritonclient_reports_kiln_s_message(client: triton.InferenceServerClient, pixels: np.ndarray) -> None:
    tensor = triton.InferInput("images", [5, 1, 28, 27], "UINT8")
    tensor.set_data_from_numpy(pixels[:, :, :, :27].copy())
    with pytest.raises(InferenceServerException) as raised:
        client.infer("kiln", [tensor])
    assert raised.value.status() == "422"
    assert "UINT8 input must have shape [N, 1, 28, 28], got [5, 1, 28, 27]" in raised.value.message()


def test_tritonclient_names_the_model_s_version(client: triton.InferenceServerClient, pixels: np.ndarray) -> None:
    assert client.get_model_metadata("kiln", model_version="run-7")["versions"] == ["run-7"]
    assert client.is_model_ready("kiln", model_version="run-7")
    tensor = triton.InferInput("images", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    assert client.infer("kiln", [tensor], model_version="run-7").as_numpy("prediction").shape == (5,)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("kiln", [tensor], model_version="1")
    assert raised.value.status() == "404"
    assert "has no version '1'; its version is 'run-7'" in raised.value.message()
