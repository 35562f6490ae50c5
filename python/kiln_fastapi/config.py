"""The server's settings, read from the environment (pydantic-settings), as in the template.

``PRED_MODEL_PATH`` names the model to serve: a kiln checkpoint, a folder holding one (a run
downloaded with ``python -m kiln.models download <run id> --dst models``), a path inside a downloaded
run as the template's guide writes it (``models/<run id>/artifacts/model/data/model``), or an MLflow
URI (``runs:/<run id>/model``). When it is unset, ``PRED_MODEL_UUID`` (an MLflow run id) is downloaded
from ``MLFLOW_TRACKING_URI`` into ``MODELS_DIR`` at start-up.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kiln.cli import logging_config_path


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=True)

    API_NAME: str = "kiln - image classification API"
    API_V1_STR: str = "/api/v1"
    # ../conf/logging.yaml when started from src/ (gunicorn --chdir src), else ./conf/logging.yaml.
    LOGGER_CONFIG_PATH: str = str(logging_config_path())

    PRED_MODEL_UUID: str = ""
    PRED_MODEL_PATH: str = ""
    MODELS_DIR: str = "./models"
    # The model's name on the Open Inference Protocol routes (/v2/models/{name}).
    MODEL_NAME: str = "kiln"
    NO_CUDA: bool = True
    # auto: int8 on x86-64 CPUs with AVX2 for checkpoints carrying kiln's int8 calibration, else training's
    # auto (bf16 where it is faster: a GPU, a CPU where it measured faster), else fp32. Or int8, bf16, fp32.
    PRECISION: str = "auto"
    # torch threads per server process; with gunicorn's -w N, N processes share the cores.
    TORCH_THREADS: int = 1

    # Request limits: beyond them the server answers 413/422 instead of working on the request.
    MAX_IMAGES_PER_REQUEST: int = 256
    MAX_REQUEST_BYTES: int = 16 * 1024 * 1024
    # An image whose header claims more pixels (width x height; 4096x4096) gets a 422 unread.
    MAX_IMAGE_PIXELS: int = Field(default=4096 * 4096, ge=1)


@lru_cache
def get_settings() -> Settings:
    return Settings()
