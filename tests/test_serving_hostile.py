"""Hostile input to the real server: any bytes to any route get a 4xx, never a 5xx, and one request's
bad image never changes another request's answer."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import struct
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.inference import load_predictor
from kiln_fastapi.batching import MicroBatcher
from test_serving import IMAGES, ModelServer, call, expected, json_batch, multipart


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, trained_checkpoint: Path):
    root = tmp_path_factory.mktemp("hostile-server")
    running = ModelServer(root, {"PRED_MODEL_PATH": str(trained_checkpoint), "PRED_MODEL_UUID": ""}, workers=2)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


PNG = IMAGES[0].read_bytes()


def png_with_chunk(chunk_type: bytes, crc: bytes = b"\0\0\0\0") -> bytes:
    """The first sample PNG with a 4-byte chunk of `chunk_type` (with a wrong CRC) after its IHDR."""
    return PNG[:33] + struct.pack(">I", 4) + chunk_type + b"data" + crc + PNG[33:]


# A critical chunk whose type bytes are not ASCII, with a bad CRC: the decoder's error names the chunk, and
# that message was not UTF-8 (a UnicodeDecodeError that failed every request predicted with it).
POISON = png_with_chunk(b"\x80\x80\x80\x80")
BAD_IMAGES = {"non-ASCII chunk": POISON, "truncated": PNG[:60], "not an image": b"GIF89a" + bytes(range(256))}

ROUTES = [
    ("POST", "/api/v1/model/predict"),
    ("GET", "/api/v1/model/version"),
    ("GET", "/api/v1/health"),
    ("GET", "/api/v1/ready"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2"),
    ("GET", "/v2/models/{name}"),
    ("GET", "/v2/models/{name}/ready"),
    ("POST", "/v2/models/{name}/infer"),
    ("GET", "/v2/models/{name}/versions/{version}"),
    ("GET", "/v2/models/{name}/versions/{version}/ready"),
    ("POST", "/v2/models/{name}/versions/{version}/infer"),
]


def test_every_route_is_fuzzed(server: ModelServer) -> None:
    status, spec = call(f"{server.url}/api/v1/openapi.json")
    assert status == 200
    served = {(method.upper(), path) for path, methods in spec["paths"].items() for method in methods}
    assert served <= set(ROUTES), f"add the new routes to ROUTES: {sorted(served - set(ROUTES))}"


def infer_request(datatype: str = "UINT8") -> bytes:
    if datatype == "UINT8":
        tensor = {"name": "images", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0] * 784}
    else:
        tensor = {"name": "images", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(PNG).decode()]}
    return json.dumps({"inputs": [tensor]}).encode()


VALID_BODIES = [json_batch(IMAGES[:1]), infer_request("UINT8"), infer_request("BYTES"), multipart([("a.png", PNG)])[0]]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
bodies = st.one_of(
    st.binary(max_size=4096),
    st.builds(
        lambda prefix, rest: prefix + rest,
        st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\x80", b'{"\xed\xa0\x80']),
        st.binary(max_size=512),
    ),
    st.builds(lambda body, cut: body[:cut], st.sampled_from(VALID_BODIES), st.integers(0, 4000)),
    st.builds(
        lambda body, at, byte: body[:at] + bytes([byte]) + body[at + 1 :],
        st.sampled_from(VALID_BODIES),
        st.integers(0, 4000),
        st.integers(0, 255),
    ),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.sampled_from(["images", "inputs", "outputs", "parameters", "id", "data", "shape", "datatype"]).flatmap(
        lambda key: json_values.map(lambda value: json.dumps({key: value}).encode())
    ),
)
header_values = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "application/octet-stream",
            "multipart/form-data; boundary=x",
            "multipart/form-data",
            "text/plain; charset=utf-8",
            "application/x-www-form-urlencoded",
        ]
    ),
    st.binary(max_size=40).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")),
)
header_names = st.sampled_from(
    ["Content-Type", "Inference-Header-Content-Length", "Content-Encoding", "Accept", "Accept-Encoding", "X-Junk"]
)
names = st.one_of(st.just("kiln"), st.text(max_size=20).filter(lambda text: "/" not in text))


def send(server: ModelServer, method: str, path: str, headers: list[tuple[str, bytes]], body: bytes) -> int:
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    route=st.sampled_from(ROUTES),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]) | st.none(),
    name=names,
    headers=st.lists(st.tuples(header_names, header_values), max_size=4),
    body=bodies,
)
def test_any_bytes_to_any_route_get_an_answer_below_500(
    server: ModelServer, route: tuple[str, str], method: str | None, name: str, headers, body: bytes
) -> None:
    path = route[1].replace("{name}", urllib.parse.quote(name, safe="")).replace("{version}", "1")
    status = send(server, method or route[0], path, headers, body)
    assert status < 500, (method or route[0], path, headers, body[:200])


def test_the_server_survived_the_fuzzing(server: ModelServer) -> None:
    assert call(f"{server.url}/v2/health/ready") == (200, {"ready": True})
    status, body = call(f"{server.url}/api/v1/model/predict", json_batch(IMAGES[:1]))
    assert status == 200, body
    log = server.log()
    assert "Exception in ASGI application" not in log and "Traceback" not in log, log[-4000:]
    assert log.count("Booting worker") == 2, "a worker died and was restarted:\n" + log[-4000:]


KNOWN_500S = [
    # FastAPI's validation handler echoed these bodies and could not encode them.
    ("/v2/models/kiln/infer", b"\xff\xfe\x00abc", "application/octet-stream"),
    ("/v2/models/kiln/infer", b"\xff\xfe\x00abc", "text/plain"),
    ("/v2/models/kiln/infer", b"[" * 100_000, "application/json"),
    ("/v2/models/kiln/infer", b'{"inputs": [{"name": "images", "shape": [1], "datatype": "\\ud800"}]}', "text/plain"),
]


@pytest.mark.parametrize(
    ("path", "body", "content_type"),
    KNOWN_500S,
    ids=["not UTF-8", "not UTF-8 as text", "deep nesting", "lone surrogate"],
)
def test_bodies_that_got_a_500_get_a_422(server: ModelServer, path: str, body: bytes, content_type: str) -> None:
    status, answer = call(f"{server.url}{path}", body, content_type)
    assert status == 422, answer
    assert "Invalid JSON" in answer["error"]


def test_a_bad_image_is_its_own_request_s_error(server: ModelServer, trained_checkpoint: Path) -> None:
    body = json.dumps(
        {
            "images": [
                {"id": index, "image": base64.b64encode(image).decode()}
                for index, image in enumerate([PNG, POISON, PNG])
            ]
        }
    ).encode()
    status, answer = call(f"{server.url}/api/v1/model/predict", body)
    assert status == 422, answer
    assert [item["loc"] for item in answer["detail"]] == [["body", "images", 1, "image"]]
    assert "not a decodable image" in answer["detail"][0]["msg"]


def test_bad_requests_never_change_the_answers_of_good_ones(server: ModelServer, trained_checkpoint: Path) -> None:
    files = IMAGES[:8]
    labels, _ = expected(trained_checkpoint, files)
    bad = list(BAD_IMAGES.values())

    def good(index: int) -> tuple[int, int, str]:
        file = files[index % len(files)]
        status, body = call(f"{server.url}/api/v1/model/predict", json_batch([file]))
        return index % len(files), status, body["data"][0]["prediction"] if status == 200 else str(body)

    def hostile(index: int) -> tuple[int, dict]:
        body, content_type = multipart([("bad.png", bad[index % len(bad)])])
        return call(f"{server.url}/api/v1/model/predict", body, content_type)

    # One bad request in four, interleaved, so the bad images share the workers' batches with good ones.
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda index: hostile(index) if index % 4 == 0 else good(index), range(320)))
    good_answers = [answer for index, answer in enumerate(answers) if index % 4]
    wrong = [
        (index, status, answer) for index, status, answer in good_answers if (status, answer) != (200, labels[index])
    ]
    assert not wrong, f"{len(wrong)} of {len(good_answers)} good requests answered wrongly: {wrong[:3]}"
    for status, answer in answers[::4]:
        assert status == 422, answer
        assert answer["detail"][0]["loc"] == ["body", "files", 0]


def test_the_batcher_answers_a_call_s_good_requests_when_one_poisons_it(trained_checkpoint: Path) -> None:
    """In one process: these requests queue together and share one predictor call. The poison's decoder
    message was not UTF-8, which made that call raise for everyone (the batcher now predicts the requests
    apart when a call raises); since the decoder escapes its messages, it is a per-image error."""
    predictor = load_predictor(trained_checkpoint, no_cuda=True)
    batcher = MicroBatcher(predictor)
    requests = [[PNG], [POISON], [IMAGES[1].read_bytes(), PNG], [PNG[:60]], [IMAGES[9].read_bytes(), POISON]]

    async def all_at_once():
        return await asyncio.gather(*(batcher.predict_encoded(images) for images in requests))

    try:
        answers = asyncio.run(all_at_once())
    finally:
        batcher.close()
    for images, (probabilities, errors) in zip(requests, answers, strict=True):
        assert len(probabilities) == len(errors) == len(images)
        for image, row, error in zip(images, probabilities, errors, strict=True):
            if image in (POISON, PNG[:60]):
                assert error, "a bad image must be reported"
                continue
            alone, alone_errors = predictor.predict_encoded([image])
            assert error is None and alone_errors == [None]
            np.testing.assert_allclose(row, alone.numpy()[0], atol=2e-3)
