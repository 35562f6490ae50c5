"""Open Inference Protocol (KServe v2) routes, so KServe-style clients and probes work unchanged.

    GET  /v2/health/live, /v2/health/ready     liveness / readiness
    GET  /v2                                   server metadata
    GET  /v2/models/{name}[/ready]             model metadata / readiness
    POST /v2/models/{name}/infer               inference

Each model route also answers under ``/v2/models/{name}/versions/{version}``, where the one version
is the served run's id (PRED_MODEL_UUID).

An inference request carries one input: either the pixels, ``datatype: "UINT8"`` with shape
``[N, C, H, W]`` (or ``[C, H, W]``) of the processed images the model was trained on (the model
metadata's UINT8 shape; a processed split's images as they are), or encoded image files, ``datatype:
"BYTES"`` with shape ``[N]`` and base64 strings as data. Both go through the checkpoint's evaluation
transform (resize, center crop) before the model, as batch inference does. The answer has two outputs:
``probabilities`` (FP32 ``[N, classes]``) and ``prediction`` (BYTES ``[N]``, class names).

Tensors may also travel as binary data after the JSON (the binary tensor data extension, see
:mod:`kiln_fastapi.v2.binary`), as NVIDIA's ``tritonclient`` sends and asks for them by default: a
binary BYTES element is the image file's own bytes, not base64.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from starlette.concurrency import run_in_threadpool

import kiln
from kiln_fastapi.config import Settings
from kiln_fastapi.deps import ServedModel, get_model, served_settings
from kiln_fastapi.prediction import check_count, classify, decode_base64, inline_schema, unprocessable
from kiln_fastapi.v2 import binary

ROUTER = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])


class InputParameters(BaseModel):
    # Set when the tensor's bytes follow the JSON instead of being in "data".
    binary_data_size: StrictInt | None = Field(default=None, ge=0)


class TensorInput(BaseModel):
    name: str
    shape: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=4)
    datatype: Literal["UINT8", "BYTES"]
    parameters: InputParameters | None = None
    data: list[Any] | None = None


class OutputParameters(BaseModel):
    binary_data: StrictBool | None = None


class RequestedOutput(BaseModel):
    name: Literal["probabilities", "prediction"]
    parameters: OutputParameters | None = None


class RequestParameters(BaseModel):
    # Every output in binary unless the output says otherwise; tritonclient sets it when no output is named.
    binary_data_output: StrictBool | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: RequestParameters | None = None
    inputs: list[TensorInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = None


class TensorOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, int] | None = Field(default=None, description="binary_data_size of a binary output")
    data: list[Any] | None = Field(default=None, description="absent for an output sent as binary data")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[TensorOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Ready(BaseModel):
    ready: bool


class Live(BaseModel):
    live: bool


class Error(BaseModel):
    error: str = Field(description="what is wrong, as the Open Inference Protocol's error response")
    detail: Any = Field(description="the same, as FastAPI's errors (a message, or a list of loc/msg/type)")


_NOT_FOUND = {404: {"description": "No model of that name is served", "model": Error}}


def _served(name: str, settings: Settings) -> None:
    if name != settings.MODEL_NAME:
        raise HTTPException(
            status_code=404, detail=f"model '{name}' is not served here; this server has '{settings.MODEL_NAME}'"
        )


@ROUTER.get("/health/live", response_model=Live)
async def live() -> Any:
    return {"live": True}


@ROUTER.get("/health/ready", response_model=Ready)
async def ready(model: Annotated[ServedModel, Depends(get_model)]) -> Any:
    return {"ready": model is not None}


@ROUTER.get("", response_model=ServerMetadata)
async def server_metadata() -> Any:
    return {"name": "kiln", "version": kiln.__version__, "extensions": ["binary_tensor_data"]}


def _versions(model: ServedModel) -> list[str]:
    return [model.model_uuid] if model.model_uuid else []


async def served_version(
    version: str,
    model: Annotated[ServedModel, Depends(get_model)],
    settings: Annotated[Settings, Depends(served_settings)],
) -> None:
    """The ``/versions/{version}`` routes' check: the model's one version is its run id (PRED_MODEL_UUID)."""
    if version not in _versions(model):
        has = f"its version is '{model.model_uuid}'" if model.model_uuid else "it has no versions (no PRED_MODEL_UUID)"
        raise HTTPException(
            status_code=404,
            detail=f"model '{settings.MODEL_NAME}' has no version '{version}'; {has}, "
            f"or leave the version out: /v2/models/{settings.MODEL_NAME}/...",
        )


_VERSIONED = {"dependencies": [Depends(served_version)], "responses": _NOT_FOUND}


@ROUTER.get("/models/{name}", response_model=ModelMetadata, responses=_NOT_FOUND)
@ROUTER.get("/models/{name}/versions/{version}", response_model=ModelMetadata, **_VERSIONED)
async def model_metadata(
    name: str,
    model: Annotated[ServedModel, Depends(get_model)],
    settings: Annotated[Settings, Depends(served_settings)],
) -> Any:
    _served(name, settings)
    channels, height, width = model.image_shape
    return {
        "name": name,
        "versions": _versions(model),
        "platform": "kiln-libtorch",
        "inputs": [
            {"name": "images", "datatype": "UINT8", "shape": [-1, channels, height, width]},
            {"name": "images", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(model.classes)]},
            {"name": "prediction", "datatype": "BYTES", "shape": [-1]},
        ],
    }


@ROUTER.get("/models/{name}/ready", response_model=Ready, responses=_NOT_FOUND)
@ROUTER.get("/models/{name}/versions/{version}/ready", response_model=Ready, **_VERSIONED)
async def model_ready(name: str, settings: Annotated[Settings, Depends(served_settings)]) -> Any:
    _served(name, settings)
    return {"ready": True}


def _shape_error(loc: list[str | int], message: str) -> HTTPException:
    return unprocessable([{"loc": [*loc, "shape"], "msg": message, "type": "shape"}])


def _data_error(loc: list[str | int], message: str) -> HTTPException:
    return unprocessable([{"loc": loc, "msg": message, "type": "data"}])


def _pixels(
    tensor: TensorInput, raw: bytes | None, loc: list[str | int], model: ServedModel, settings: Settings
) -> np.ndarray:
    """The UINT8 input as an array [N, C, H, W], from its JSON data or its binary data."""
    shape = list(tensor.shape)
    if len(shape) == 3:
        shape = [1, *shape]
    if len(shape) != 4 or tuple(shape[1:]) != model.image_shape:
        channels, height, width = model.image_shape
        raise _shape_error(loc, f"UINT8 input must have shape [N, {channels}, {height}, {width}], got {tensor.shape}")
    check_count(shape[0], settings, [*loc, "shape"])
    expected = shape[0] * shape[1] * shape[2] * shape[3]
    if raw is not None:
        if len(raw) != expected:
            raise _data_error(
                [*loc, "parameters", "binary_data_size"],
                f"UINT8 shape {tensor.shape} needs {expected} bytes of binary data (one per value), got {len(raw)}",
            )
        return np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()
    try:
        flat = np.asarray(tensor.data, dtype=np.int64).reshape(-1)
    except (ValueError, TypeError, OverflowError) as error:
        raise _data_error([*loc, "data"], f"data must be integers: {error}") from error
    if flat.size != expected:
        raise _data_error([*loc, "data"], f"shape {tensor.shape} needs {expected} values, got {flat.size}")
    if flat.size and (flat.min() < 0 or flat.max() > 255):
        raise _data_error([*loc, "data"], "UINT8 values must be within 0..255")
    return flat.astype(np.uint8).reshape(shape)


def _encoded_images(
    tensor: TensorInput, raw: bytes | None, loc: list[str | int], settings: Settings
) -> tuple[list[bytes], list[list[str | int]]]:
    """The BYTES input's image files: base64 strings in its JSON data, or raw files in its binary data."""
    if raw is not None:
        images = binary.bytes_elements(raw, settings.MAX_IMAGES_PER_REQUEST, [*loc, "parameters", "binary_data_size"])
        form = "binary elements"
    else:
        images = tensor.data or []
        form = "base64 images"
    if len(tensor.shape) != 1 or tensor.shape[0] != len(images):
        raise _shape_error(loc, f"BYTES input must have shape [{len(images)}] (its {form}), got {tensor.shape}")
    check_count(len(images), settings, [*loc, "data"])
    locs: list[list[str | int]] = [[*loc, "data", index] for index in range(len(images))]
    if raw is not None:
        for image, image_loc in zip(images, locs, strict=True):
            if not image:
                raise unprocessable([{"loc": image_loc, "msg": "the image is empty", "type": "image"}])
        return images, locs
    for item, image_loc in zip(images, locs, strict=True):
        if not isinstance(item, str):
            raise _data_error(image_loc, "BYTES data must be base64 strings")
    return [decode_base64(item, image_loc) for item, image_loc in zip(images, locs, strict=True)], locs


def _parse(body: bytes, header_length: str | None) -> tuple[InferenceRequest, list[bytes | None]]:
    """The request's JSON and, per input, its binary data (None for an input given as JSON data)."""
    header, tail = binary.split_body(body, header_length)
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as error:
        raise RequestValidationError(
            [{**e, "loc": ["body", *e["loc"]]} for e in error.errors(include_url=False, include_input=False)]
        ) from error
    raws: list[bytes | None] = []
    offset = 0
    for index, tensor in enumerate(request.inputs):
        loc: list[str | int] = ["body", "inputs", index]
        size = tensor.parameters.binary_data_size if tensor.parameters else None
        if size is None:
            if tensor.data is None:
                raise _data_error(
                    [*loc, "data"],
                    f"input '{tensor.name}' has no data: give \"data\", or parameters.binary_data_size and the "
                    f"bytes after the JSON (with the {binary.HEADER_LENGTH} header)",
                )
            raws.append(None)
            continue
        if tensor.data is not None:
            raise _data_error(loc, f"input '{tensor.name}' has both \"data\" and parameters.binary_data_size")
        if offset + size > len(tail):
            where = (
                f"only {len(tail) - offset} bytes of binary data follow the JSON"
                if header_length is not None
                else f"the request has no {binary.HEADER_LENGTH} header, so no binary data follows its JSON"
            )
            raise binary.bad_body(f"input '{tensor.name}' has binary_data_size {size}, but {where}")
        raws.append(tail[offset : offset + size])
        offset += size
    if offset != len(tail):
        raise binary.bad_body(
            f"{len(tail) - offset} bytes after the JSON ({binary.HEADER_LENGTH}) belong to no input: "
            "the inputs' binary_data_size must add up to the binary data sent"
        )
    return request, raws


_INFER_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": inline_schema(InferenceRequest.model_json_schema())},
        "application/octet-stream": {
            "schema": {
                "type": "string",
                "format": "binary",
                "description": f"the JSON request, then binary tensor data; {binary.HEADER_LENGTH} gives the "
                "JSON's length",
            }
        },
    },
}


_INFER_ROUTE: dict[str, Any] = dict(
    response_model=InferenceResponse,
    openapi_extra={"requestBody": _INFER_BODY},
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "JSON, or with binary outputs the JSON header and the outputs' bytes",
        },
        **_NOT_FOUND,
        400: {"description": "The body is not what its headers say", "model": Error},
        413: {"description": "Too many images or too large a body", "model": Error},
        415: {"description": "An unsupported Content-Encoding", "model": Error},
        422: {"description": "Invalid tensor, or an image that cannot be decoded", "model": Error},
    },
)


@ROUTER.post("/models/{name}/infer", **_INFER_ROUTE)
@ROUTER.post("/models/{name}/versions/{version}/infer", **{**_INFER_ROUTE, "dependencies": [Depends(served_version)]})
async def infer(
    name: str,
    request: Request,
    model: Annotated[ServedModel, Depends(get_model)],
    settings: Annotated[Settings, Depends(served_settings)],
    header_length: Annotated[
        str | None,
        Header(
            alias=binary.HEADER_LENGTH,
            description="the length of the JSON at the start of the body when binary tensor data follows it",
        ),
    ] = None,
) -> Any:
    import torch

    _served(name, settings)
    body = await request.body()
    encoding = request.headers.get("content-encoding", "").strip().lower() or "identity"
    if encoding in ("gzip", "deflate"):
        body = binary.inflate(body, encoding, settings.MAX_REQUEST_BYTES)
    elif encoding != "identity":
        raise HTTPException(
            status_code=415, detail=f"Content-Encoding '{encoding[:40]}' is not supported: send gzip, deflate or none"
        )
    parsed, raws = _parse(body, header_length)
    tensor, raw, loc = parsed.inputs[0], raws[0], ["body", "inputs", 0]
    if tensor.datatype == "UINT8":
        pixels = _pixels(tensor, raw, loc, model, settings)
        probabilities = (await run_in_threadpool(model.predictor.predict, torch.from_numpy(pixels))).numpy()
    else:
        images, locs = _encoded_images(tensor, raw, loc, settings)
        probabilities = await classify(model, images, locs)
    return _answer(parsed, name, model, probabilities)


def _answer(request: InferenceRequest, name: str, model: ServedModel, probabilities: np.ndarray) -> Response:
    """The outputs asked for (by default both), each as JSON data or binary data as requested."""
    binary_default = bool(request.parameters and request.parameters.binary_data_output)
    wanted = request.outputs or [RequestedOutput(name="probabilities"), RequestedOutput(name="prediction")]
    outputs, blobs = [], []
    for output in {output.name: output for output in wanted}.values():
        as_binary = binary_default
        if output.parameters and output.parameters.binary_data is not None:
            as_binary = output.parameters.binary_data
        if output.name == "probabilities":
            tensor = {"name": "probabilities", "shape": list(probabilities.shape), "datatype": "FP32"}
            if as_binary:
                blob = probabilities.astype("<f4", copy=False).tobytes()
            else:
                values: list[Any] = probabilities.reshape(-1).tolist()
        else:
            labels = [model.classes[label] for label in probabilities.argmax(axis=1).tolist()]
            tensor = {"name": "prediction", "shape": [len(labels)], "datatype": "BYTES"}
            if as_binary:
                blob = binary.encode_bytes([label.encode() for label in labels])
            else:
                values = labels
        if as_binary:
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = values
        outputs.append(tensor)
    header = {"model_name": name, "model_version": model.model_uuid or None, "id": request.id, "outputs": outputs}
    if blobs:
        return binary.binary_response(header, blobs)
    return Response(content=binary.json_bytes(header), media_type="application/json")
