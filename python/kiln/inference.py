"""Batch inference behind ``python src/batch_inferencing.py``.

The C++ core lists the matching files, reads and decodes them on all cores exactly as data
preparation did, applies the checkpoint's evaluation transform (resize, center crop) as the server
does, predicts in batches and writes the JSON lines; this module resolves the model and the paths,
shows progress and logs the outcome.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.models import resolve_checkpoint
from kiln.precision import load_predictor
from kiln.processing import max_image_pixels
from kiln.progress import ProgressBar

if TYPE_CHECKING:
    from kiln._core import Predictor

logger = logging.getLogger(__name__)


def transform_text(predictor: Predictor) -> str:
    """For logs: ", then resize 72x72, then center_crop 64x64" when the checkpoint has an evaluation
    transform ("resize 72" alone: the shorter edge), else ""."""
    steps = [f"{name} {'x'.join(map(str, size))}" for name, size in predictor.eval_transform.items() if size]
    return "".join(f", then {step}" for step in steps)


def batch_infer(cfg: Mapping[str, Any], output_dir: Path) -> dict[str, Any]:
    """Classify ``cfg["inference"]["input_data_dir"]``; the JSON lines go to ``output_dir``.

    Returns ``{"files", "classified", "failed", "output_path"}``. Raises ``FileNotFoundError`` for a
    missing model or input dir and ``ValueError`` when no file matches the glob; then no output file
    is written.
    """
    from omegaconf import DictConfig, OmegaConf

    import kiln

    if isinstance(cfg, DictConfig):
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ValueError(
                "set " + " and ".join(f"{key}=..." for key in missing) + " (e.g. python src/batch_inferencing.py "
                "inference.model_path=models/<run id> inference.input_data_dir=./data/new)"
            )
    inference = cfg["inference"]
    input_dir = Path(inference["input_data_dir"])
    pixel_budget = max_image_pixels(inference.get("max_image_pixels"), "inference.max_image_pixels")
    if not input_dir.is_dir():
        raise FileNotFoundError(f"inference.input_data_dir '{input_dir}' does not exist or is not a directory")
    # A model from MLflow (runs:/...) is downloaded to a temp dir, removed once the predictor holds it.
    with tempfile.TemporaryDirectory(prefix="kiln-model-") as download_dir:
        checkpoint = resolve_checkpoint(inference["model_path"], cache_dir=download_dir)
        predictor = load_predictor(checkpoint, bool(cfg["no_cuda"]), str(inference["precision"]))
    predictor.max_image_pixels = pixel_budget
    output_path = output_dir / inference["output_path"]
    output_path.parent.mkdir(parents=True, exist_ok=True)
    glob = inference["file_check_glob"]
    logger.info(
        "Classifying %s/%s with %s (%s, %d classes, images %s%s, %s)",
        input_dir,
        glob,
        checkpoint,
        predictor.model_name,
        len(predictor.classes),
        "x".join(map(str, predictor.image_shape)),
        transform_text(predictor),
        predictor.precision,
    )

    progress = ProgressBar("Classifying images", unit="img")
    started = time.perf_counter()
    try:
        summary = kiln.classify_directory(
            predictor,
            input_dir,
            glob=glob,
            output_path=output_path,
            batch_size=int(inference["batch_size"]),
            progress=progress,
        )
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    if summary["failed"]:
        logger.warning(
            '%d of %d files could not be classified; their lines carry an "error" field',
            summary["failed"],
            summary["files"],
        )
    logger.info(
        "Classified %d images in %.2fs (%.0f images/s)",
        summary["classified"],
        elapsed,
        summary["files"] / elapsed if elapsed > 0 else float("inf"),
    )
    logger.info("Batch inference results are saved to %s", output_path)
    return {**summary, "output_path": str(output_path)}
