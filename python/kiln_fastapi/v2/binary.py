"""The Open Inference Protocol's binary tensor data extension, as KServe and Triton define it.

A request may carry tensor bytes after its JSON: the ``Inference-Header-Content-Length`` header gives
the JSON's length, and each input with ``parameters.binary_data_size`` takes that many of the bytes
that follow, in the order of the inputs. Binary tensors are little-endian, row-major, unpadded; a
``BYTES`` tensor is its elements in turn, each a 4-byte little-endian length and then the bytes. An
answer puts outputs asked for in binary after its JSON the same way, with ``binary_data_size`` in the
output's parameters and the JSON's length in the response header.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from typing import Any

from fastapi import HTTPException
from fastapi.responses import Response

from kiln_fastapi.prediction import too_many, unprocessable

HEADER_LENGTH = "Inference-Header-Content-Length"


def bad_body(message: str) -> HTTPException:
    return HTTPException(status_code=400, detail=message)


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """The body of a ``Content-Encoding: gzip|deflate`` request, never more than ``limit`` bytes inflated."""
    # wbits 31: a gzip stream; 15: a zlib stream, which is what HTTP's "deflate" carries.
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as error:
        raise bad_body(f"the body is not valid {encoding} data (Content-Encoding: {encoding}): {error}") from error
    if len(data) > limit:
        raise HTTPException(
            status_code=413, detail=f"the {encoding} body inflates to more than {limit} bytes (MAX_REQUEST_BYTES)"
        )
    if not inflater.eof:
        raise bad_body(f"the {encoding} body is truncated (Content-Encoding: {encoding})")
    return data


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(the JSON header, the binary tensor data after it) of a request body."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not text.isdigit() or not text.isascii():
        raise bad_body(f"{HEADER_LENGTH} must be the JSON header's length in bytes, got {header_length[:40]!r}")
    length = int(text)
    if length == 0 or length > len(body):
        raise bad_body(
            f"{HEADER_LENGTH} is {length}, but the body has {len(body)} bytes: "
            "the header must give the length of the JSON that starts the body"
        )
    return body[:length], body[length:]


def bytes_elements(data: bytes, limit: int, loc: Sequence[str | int]) -> list[bytes]:
    """The elements of a binary BYTES tensor: each a 4-byte little-endian length, then its bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(data):
        if len(elements) == limit:
            raise too_many(f"more than {limit}", limit)
        if offset + 4 > len(data):
            raise unprocessable(
                [
                    {
                        "loc": list(loc),
                        "msg": f"BYTES binary data ends inside the 4-byte length of element {len(elements)} "
                        f"({len(data) - offset} bytes left)",
                        "type": "binary_data",
                    }
                ]
            )
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + size > len(data):
            raise unprocessable(
                [
                    {
                        "loc": list(loc),
                        "msg": f"BYTES element {len(elements)} has a length of {size} bytes, but only "
                        f"{len(data) - offset} bytes of the input's binary data are left",
                        "type": "binary_data",
                    }
                ]
            )
        elements.append(data[offset : offset + size])
        offset += size
    return elements


def encode_bytes(elements: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def json_bytes(content: Any) -> bytes:
    """Compact JSON, non-ASCII escaped: valid UTF-8 whatever strings a client sent."""
    return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def binary_response(header: dict[str, Any], blobs: Sequence[bytes]) -> Response:
    """The JSON header followed by the binary outputs, its length in ``Inference-Header-Content-Length``."""
    encoded = json_bytes(header)
    return Response(
        content=encoded + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(encoded))},
    )
