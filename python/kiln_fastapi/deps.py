"""The served model, loaded once per server process when the app starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request

from kiln_fastapi.batching import MicroBatcher
from kiln_fastapi.config import Settings, get_settings

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The configured model cannot be served; the server refuses to start."""


@dataclass
class ServedModel:
    predictor: Any  # kiln.Predictor
    batcher: MicroBatcher
    checkpoint: Path
    model_uuid: str
    classes: list[str] = field(default_factory=list)
    # The shape files are decoded to and UINT8 tensors must have: the processed images the model was
    # trained on, before the checkpoint's evaluation transform.
    image_shape: tuple[int, int, int] = (1, 0, 0)


def load_model(settings: Settings) -> ServedModel:
    """Resolve PRED_MODEL_PATH (or download PRED_MODEL_UUID) and load it into the C++ predictor."""
    import torch

    from kiln.inference import transform_text
    from kiln.models import download, resolve_checkpoint
    from kiln.precision import load_predictor

    try:
        if settings.PRED_MODEL_PATH:
            checkpoint = resolve_checkpoint(settings.PRED_MODEL_PATH, cache_dir=settings.MODELS_DIR)
        elif settings.PRED_MODEL_UUID:
            checkpoint = resolve_checkpoint(download(settings.PRED_MODEL_UUID, settings.MODELS_DIR))
        else:
            raise ModelLoadError(
                "no model to serve: set PRED_MODEL_PATH (a kiln checkpoint, a downloaded run folder or "
                "runs:/<run id>/model) or PRED_MODEL_UUID (an MLflow run id, with MLFLOW_TRACKING_URI)"
            )
        if settings.TORCH_THREADS > 0:
            torch.set_num_threads(settings.TORCH_THREADS)
        predictor = load_predictor(checkpoint, settings.NO_CUDA, settings.PRECISION)
        predictor.max_image_pixels = settings.MAX_IMAGE_PIXELS
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"cannot load the model to serve: {error}") from error
    logger.info(
        "Serving %s (%s, epoch %d, %d classes, images %s%s, %s) from %s",
        settings.PRED_MODEL_UUID or checkpoint.name,
        predictor.model_name,
        predictor.epoch,
        len(predictor.classes),
        "x".join(map(str, predictor.image_shape)),
        transform_text(predictor),
        predictor.precision,
        checkpoint,
    )
    return ServedModel(
        predictor=predictor,
        batcher=MicroBatcher(predictor, max_images=settings.MAX_IMAGES_PER_REQUEST),
        checkpoint=checkpoint,
        model_uuid=settings.PRED_MODEL_UUID,
        classes=list(predictor.classes),
        image_shape=tuple(predictor.image_shape),
    )


# The dependencies are coroutines: FastAPI runs a plain-def dependency or route in its thread pool, a
# thread hop per request for what is an attribute read.
async def get_model(request: Request) -> ServedModel:
    return request.app.state.model


async def served_settings() -> Settings:
    return get_settings()
