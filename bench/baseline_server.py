"""The plain FastAPI + PyTorch model server a user would otherwise write, for bench/serve.py.

Same request and answer as kiln's ``POST /api/v1/model/predict`` (JSON, base64 images with ids):
PIL decodes each image, the PyTorch MNIST-example Net (kiln's checkpoint weights) predicts it.

    BASELINE_CHECKPOINT=checkpoint.pt gunicorn baseline_server:APP -k uvicorn.workers.UvicornWorker --chdir bench
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import torch
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel

from train import python_model_from_checkpoint

torch.set_num_threads(int(os.environ.get("BASELINE_TORCH_THREADS", "1")))
MODEL, CLASSES, MEAN, STD = python_model_from_checkpoint(os.environ["BASELINE_CHECKPOINT"])


class ImageIn(BaseModel):
    id: int | str
    image: str


class PredictRequest(BaseModel):
    images: list[ImageIn]


APP = FastAPI()


@APP.post("/api/v1/model/predict")
def predict(request: PredictRequest) -> dict:
    data = []
    for item in request.images:
        with Image.open(io.BytesIO(base64.b64decode(item.image))) as image:
            pixels = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32)).unsqueeze(0) / 255
        with torch.no_grad():
            probabilities = torch.softmax(MODEL(((pixels - MEAN) / STD).unsqueeze(0)), dim=1)[0]
        probability, label = probabilities.max(0)
        data.append(
            {
                "id": item.id,
                "prediction": CLASSES[int(label)],
                "probability": float(probability),
                "probabilities": dict(zip(CLASSES, probabilities.tolist(), strict=True)),
            }
        )
    return {"data": data}


@APP.get("/v2/health/ready")
def ready() -> dict:
    return {"ready": True}
