"""The template's routes: ``POST {API_V1_STR}/model/predict`` and ``GET {API_V1_STR}/model/version``.

A prediction request is a batch of encoded images (PNG, JPEG, ...), either as JSON with base64
strings and an id per image, or as a multipart upload of files (ids are the file names):

    curl -X POST localhost:8080/api/v1/model/predict -H 'Content-Type: application/json' \\
      -d '{"images": [{"id": 1, "image": "'$(base64 -w0 shoe.png)'"}]}'
    curl -X POST localhost:8080/api/v1/model/predict -F files=@shoe.png -F files=@bag.png
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln_fastapi.config import get_settings
from kiln_fastapi.deps import ServedModel, get_model
from kiln_fastapi.prediction import check_count, classify, decode_base64, inline_schema, too_many, unprocessable

ROUTER = APIRouter()


class ImageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: int | str = Field(description="the caller's id for this image, echoed in the answer")
    image: str = Field(description="the encoded image file (PNG, JPEG, ...) in base64")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: list[ImageIn] = Field(min_length=1)


class Prediction(BaseModel):
    id: int | str
    prediction: str = Field(description="the most probable class")
    probability: float = Field(description="its probability")
    probabilities: dict[str, float] = Field(description="every class's probability")


class PredictResponse(BaseModel):
    data: list[Prediction]


class EvalTransform(BaseModel):
    resize: list[int] | None = Field(description="[height, width], [shorter edge] or null: torchvision's Resize")
    center_crop: list[int] | None = Field(description="[height, width] or null: torchvision's CenterCrop")


class ModelVersion(BaseModel):
    model_uuid: str = Field(description="the MLflow run id of the served model (PRED_MODEL_UUID)")
    model_name: str
    epoch: int
    classes: list[str]
    image_shape: list[int] = Field(
        description="[C, H, W] images are decoded to (the processed images the model was trained on)"
    )
    eval_transform: EvalTransform = Field(
        description="the checkpoint's evaluation transform, applied to every image before the model"
    )


class VersionResponse(BaseModel):
    data: ModelVersion


_REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": inline_schema(PredictRequest.model_json_schema())},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}
                },
                "required": ["files"],
            }
        },
    },
}
_ERRORS = {
    400: {"description": "The body is not what its Content-Type says"},
    413: {"description": "Too many images or too large a body"},
    415: {"description": "Neither application/json nor multipart/form-data"},
    422: {"description": "Invalid request or an image that cannot be decoded (the detail names which)"},
}


async def _json_images(request: Request) -> tuple[list[bytes], list[int | str], list[list[str | int]]]:
    body = await request.body()
    try:
        parsed = PredictRequest.model_validate_json(body)
    except ValidationError as error:
        raise RequestValidationError(
            [{**e, "loc": ["body", *e["loc"]]} for e in error.errors(include_url=False, include_input=False)]
        ) from error
    locs = [["body", "images", index, "image"] for index in range(len(parsed.images))]
    check_count(len(parsed.images), get_settings(), ["body", "images"])
    images = [decode_base64(item.image, loc) for item, loc in zip(parsed.images, locs, strict=True)]
    return images, [item.id for item in parsed.images], locs


async def _uploaded_images(request: Request) -> tuple[list[bytes], list[int | str], list[list[str | int]]]:
    settings = get_settings()
    try:
        form = await request.form(max_files=settings.MAX_IMAGES_PER_REQUEST)
    except StarletteHTTPException as error:  # Starlette's answer to a multipart body it cannot parse
        if str(error.detail).startswith("Too many files"):
            raise too_many(f"more than {settings.MAX_IMAGES_PER_REQUEST}", settings.MAX_IMAGES_PER_REQUEST) from error
        raise HTTPException(status_code=400, detail=f"malformed multipart body: {error.detail}") from error
    except Exception as error:  # python-multipart's parse errors
        raise HTTPException(status_code=400, detail=f"malformed multipart body: {error}") from error
    uploads = [item for item in form.getlist("files") if isinstance(item, UploadFile)]
    check_count(len(uploads), settings, ["body", "files"])
    images = [await upload.read() for upload in uploads]
    ids: list[int | str] = [upload.filename or str(index) for index, upload in enumerate(uploads)]
    locs: list[list[str | int]] = [["body", "files", index] for index in range(len(uploads))]
    for data, loc in zip(images, locs, strict=True):
        if not data:
            raise unprocessable([{"loc": loc, "msg": "the image is empty", "type": "image"}])
    return images, ids, locs


@ROUTER.post(
    "/predict",
    response_model=PredictResponse,
    openapi_extra={"requestBody": _REQUEST_BODY},
    responses=_ERRORS,
    summary="Classify a batch of images",
)
async def predict(request: Request, model: Annotated[ServedModel, Depends(get_model)]) -> Any:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        images, ids, locs = await _json_images(request)
    elif content_type == "multipart/form-data":
        images, ids, locs = await _uploaded_images(request)
    else:
        raise HTTPException(
            status_code=415,
            detail=f"Content-Type '{content_type or 'none'}' is not supported: send application/json "
            '({"images": [{"id": ..., "image": "<base64>"}]}) or multipart/form-data (files=@image.png)',
        )
    probabilities = await classify(model, images, locs)
    best = probabilities.argmax(axis=1)
    top = probabilities[np.arange(len(best)), best]
    classes = model.classes
    data = [
        {
            "id": image_id,
            "prediction": classes[label],
            "probability": float(probability),
            "probabilities": dict(zip(classes, row, strict=True)),
        }
        for image_id, label, probability, row in zip(ids, best.tolist(), top, probabilities.tolist(), strict=True)
    ]
    # Built to the PredictResponse schema already: skip FastAPI's second validation pass.
    return JSONResponse({"data": data})


@ROUTER.get("/version", response_model=VersionResponse, summary="The served model")
async def version(model: Annotated[ServedModel, Depends(get_model)]) -> Any:
    return {
        "data": {
            "model_uuid": model.model_uuid,
            "model_name": model.predictor.model_name,
            "epoch": model.predictor.epoch,
            "classes": model.classes,
            "image_shape": list(model.image_shape),
            "eval_transform": model.predictor.eval_transform,
        }
    }
