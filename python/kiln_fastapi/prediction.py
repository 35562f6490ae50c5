"""What every route shares: encoded images in, class probabilities out, via the C++ predictor.

Images are decoded exactly as data preparation decoded the training images; an image of another
size or channel count is converted the same way (resized, RGB <-> grayscale), not refused. The
checkpoint's evaluation transform (resize, center crop) then brings them to the model's input, in the
C++ predictor, the same code batch inference runs.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from collections.abc import Sequence
from typing import Any

from fastapi import HTTPException

from kiln_fastapi.config import Settings
from kiln_fastapi.deps import ServedModel


def unprocessable(errors: list[dict[str, Any]]) -> HTTPException:
    """A 422 in FastAPI's own error shape: {"detail": [{"loc", "msg", "type"}]}."""
    return HTTPException(status_code=422, detail=errors)


def too_many(count: int | str, limit: int) -> HTTPException:
    return HTTPException(
        status_code=413,
        detail=f"{count} images in one request; the limit is {limit} (MAX_IMAGES_PER_REQUEST): split the batch",
    )


def check_count(count: int, settings: Settings, loc: Sequence[str | int]) -> None:
    if count == 0:
        raise unprocessable([{"loc": list(loc), "msg": "the request holds no image", "type": "too_short"}])
    if count > settings.MAX_IMAGES_PER_REQUEST:
        raise too_many(count, settings.MAX_IMAGES_PER_REQUEST)


def inline_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its $defs inlined, for a hand-written OpenAPI requestBody."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


def decode_base64(text: str, loc: Sequence[str | int]) -> bytes:
    try:
        data = b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise unprocessable([{"loc": list(loc), "msg": f"not valid base64: {error}", "type": "base64"}]) from error
    if not data:
        raise unprocessable([{"loc": list(loc), "msg": "the image is empty", "type": "image"}])
    return data


async def classify(model: ServedModel, images: list[bytes], locs: list[list[str | int]]):
    """Probabilities float32 [N, classes] (numpy) for encoded images; 422 naming every undecodable one."""
    probabilities, errors = await model.batcher.predict_encoded(images)
    failed = [
        {"loc": loc, "msg": f"not a decodable image: {error}", "type": "image"}
        for loc, error in zip(locs, errors, strict=True)
        if error is not None
    ]
    if failed:
        raise unprocessable(failed)
    return probabilities
