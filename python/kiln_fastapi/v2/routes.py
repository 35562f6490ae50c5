"""Open Inference Protocol (KServe v2) routes, so KServe-style clients and probes work unchanged.

    GET  /v2/health/live, /v2/health/ready     liveness / readiness
    GET  /v2                                   server metadata
    GET  /v2/models/{name}[/ready]             model metadata / readiness
    POST /v2/models/{name}/infer               inference

An inference request carries one input: either the pixels, ``datatype: "UINT8"`` with shape
``[N, C, H, W]`` (or ``[C, H, W]``) in the model's layout, or encoded image files, ``datatype:
"BYTES"`` with shape ``[N]`` and base64 strings as data. The answer has two outputs:
``probabilities`` (FP32 ``[N, classes]``) and ``prediction`` (BYTES ``[N]``, class names).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

import kiln
from kiln_fastapi.config import Settings, get_settings
from kiln_fastapi.deps import ServedModel, get_model
from kiln_fastapi.prediction import check_count, classify, decode_base64, unprocessable

ROUTER = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])


class TensorInput(BaseModel):
    name: str
    shape: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=4)
    datatype: Literal["UINT8", "BYTES"]
    parameters: dict[str, Any] | None = None
    data: list[Any]


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[TensorInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = None


class TensorOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


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


_NOT_FOUND = {404: {"description": "No model of that name is served"}}


def _served(name: str, settings: Settings) -> None:
    if name != settings.MODEL_NAME:
        raise HTTPException(
            status_code=404, detail=f"model '{name}' is not served here; this server has '{settings.MODEL_NAME}'"
        )


@ROUTER.get("/health/live", response_model=Live)
def live() -> Any:
    return {"live": True}


@ROUTER.get("/health/ready", response_model=Ready)
def ready(model: Annotated[ServedModel, Depends(get_model)]) -> Any:
    return {"ready": model is not None}


@ROUTER.get("", response_model=ServerMetadata)
def server_metadata() -> Any:
    return {"name": "kiln", "version": kiln.__version__, "extensions": []}


@ROUTER.get("/models/{name}", response_model=ModelMetadata, responses=_NOT_FOUND)
def model_metadata(
    name: str, model: Annotated[ServedModel, Depends(get_model)], settings: Annotated[Settings, Depends(get_settings)]
) -> Any:
    _served(name, settings)
    channels, height, width = model.image_shape
    return {
        "name": name,
        "versions": [model.model_uuid] if model.model_uuid else [],
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
def model_ready(name: str, settings: Annotated[Settings, Depends(get_settings)]) -> Any:
    _served(name, settings)
    return {"ready": True}


def _pixels(tensor: TensorInput, model: ServedModel, settings: Settings) -> np.ndarray:
    loc = ["body", "inputs", 0]
    shape = list(tensor.shape)
    if len(shape) == 3:
        shape = [1, *shape]
    if len(shape) != 4 or tuple(shape[1:]) != model.image_shape:
        channels, height, width = model.image_shape
        raise unprocessable(
            [
                {
                    "loc": [*loc, "shape"],
                    "msg": f"UINT8 input must have shape [N, {channels}, {height}, {width}], got {tensor.shape}",
                    "type": "shape",
                }
            ]
        )
    check_count(shape[0], settings, [*loc, "shape"])
    expected = int(np.prod(shape))
    try:
        flat = np.asarray(tensor.data, dtype=np.int64).reshape(-1)
    except (ValueError, TypeError, OverflowError) as error:
        raise unprocessable(
            [{"loc": [*loc, "data"], "msg": f"data must be integers: {error}", "type": "data"}]
        ) from error
    if flat.size != expected:
        raise unprocessable(
            [
                {
                    "loc": [*loc, "data"],
                    "msg": f"shape {tensor.shape} needs {expected} values, got {flat.size}",
                    "type": "data",
                }
            ]
        )
    if flat.size and (flat.min() < 0 or flat.max() > 255):
        raise unprocessable([{"loc": [*loc, "data"], "msg": "UINT8 values must be within 0..255", "type": "data"}])
    return flat.astype(np.uint8).reshape(shape)


@ROUTER.post(
    "/models/{name}/infer",
    response_model=InferenceResponse,
    responses={
        **_NOT_FOUND,
        400: {"description": "The body cannot be parsed"},
        413: {"description": "Too many images"},
        422: {"description": "Invalid tensor"},
    },
)
async def infer(
    name: str,
    request: InferenceRequest,
    model: Annotated[ServedModel, Depends(get_model)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Any:
    import torch

    _served(name, settings)
    tensor = request.inputs[0]
    if tensor.datatype == "UINT8":
        pixels = _pixels(tensor, model, settings)
        probabilities = (await run_in_threadpool(model.predictor.predict, torch.from_numpy(pixels))).numpy()
    else:
        if len(tensor.shape) != 1 or tensor.shape[0] != len(tensor.data):
            raise unprocessable(
                [
                    {
                        "loc": ["body", "inputs", 0, "shape"],
                        "msg": f"BYTES input must have shape [{len(tensor.data)}] "
                        f"(one base64 image per element), got {tensor.shape}",
                        "type": "shape",
                    }
                ]
            )
        check_count(len(tensor.data), settings, ["body", "inputs", 0, "data"])
        locs: list[list[str | int]] = [["body", "inputs", 0, "data", index] for index in range(len(tensor.data))]
        for item, loc in zip(tensor.data, locs, strict=True):
            if not isinstance(item, str):
                raise unprocessable([{"loc": loc, "msg": "BYTES data must be base64 strings", "type": "data"}])
        images = [decode_base64(item, loc) for item, loc in zip(tensor.data, locs, strict=True)]
        probabilities = await classify(model, images, locs)
    wanted = {output.name for output in request.outputs} if request.outputs else {"probabilities", "prediction"}
    outputs = []
    if "probabilities" in wanted:
        outputs.append(
            {
                "name": "probabilities",
                "shape": list(probabilities.shape),
                "datatype": "FP32",
                "data": probabilities.reshape(-1).tolist(),
            }
        )
    if "prediction" in wanted:
        labels = probabilities.argmax(axis=1).tolist() if probabilities.shape[0] else []
        outputs.append(
            {
                "name": "prediction",
                "shape": [len(labels)],
                "datatype": "BYTES",
                "data": [model.classes[label] for label in labels],
            }
        )
    unknown = wanted - {"probabilities", "prediction"}
    if unknown:
        raise unprocessable(
            [
                {
                    "loc": ["body", "outputs"],
                    "msg": f"unknown outputs {sorted(unknown)}; this model has 'probabilities' and 'prediction'",
                    "type": "outputs",
                }
            ]
        )
    return {"model_name": name, "model_version": model.model_uuid or None, "id": request.id, "outputs": outputs}
