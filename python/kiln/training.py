"""Training behind ``python src/train_model.py``.

Every epoch is computed by kiln's C++ trainer; this module wires the Hydra config to it, tracks the
run in MLflow (params, per-epoch metrics, config, checkpoint, plots, a pyfunc model) and resumes
interrupted runs.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln import general_utils
from kiln.general_utils import TRAINING_METRICS, TrackingError, mlflow_log
from kiln.progress import ProgressBar

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_ARTIFACT_DIR = "checkpoint"


def resolve_device(no_cuda: bool) -> str:
    import torch

    return "cuda" if not no_cuda and torch.cuda.is_available() else "cpu"


def resolve_precision(requested: str, device: str) -> str:
    """``auto`` is bf16 where the hardware computes it natively (same accuracy, faster), else fp32."""
    import torch

    if requested in ("fp32", "bf16"):
        return requested
    if requested != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, got {requested!r}")
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def _metrics(epoch_metrics: Mapping[str, float]) -> dict[str, float]:
    return {key: float(epoch_metrics[key]) for key in TRAINING_METRICS}


def _find_checkpoint(local: Path, run_id: str | None) -> Path | None:
    """The run's checkpoint: the local copy, else the one logged to the run (another machine's)."""
    if local.is_file():
        return local
    if run_id is None:
        return None
    import mlflow

    try:
        downloaded = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"{CHECKPOINT_ARTIFACT_DIR}/{CHECKPOINT_NAME}"
        )
    except Exception as error:  # no such artifact
        logger.debug("No checkpoint artifact in run %s: %s", run_id, error)
        return None
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(local.name + ".download")
    shutil.copyfile(downloaded, partial)
    os.replace(partial, local)  # a killed copy never leaves a truncated checkpoint behind
    return local


def _log_model(trainer, checkpoint: Path) -> None:
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    import kiln

    channels, height, width = trainer.image_shape
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, channels, height, width))]))
    # kiln states the signature explicitly; MLflow still advises predict() type hints (a warning).
    mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(kiln.__file__).with_name("mlflow_model.py")),
        artifacts={"checkpoint": str(checkpoint)},
        signature=signature,
        input_example=np.zeros((1, channels, height, width), dtype=np.uint8),
        pip_requirements=["torch==2.13.0", f"kiln-mlops=={kiln.__version__}"],
    )


def _log_plots(trainer) -> None:
    import mlflow
    from matplotlib import pyplot as plt

    from kiln.plotting import plot_confusion_matrix, plot_training_curves

    for figure, name in (
        (plot_training_curves(trainer.history), "plots/loss_accuracy.png"),
        (
            plot_confusion_matrix(trainer.confusion_matrix(), trainer.classes),
            "plots/confusion_matrix.png",
        ),
    ):
        mlflow.log_figure(figure, name)
        plt.close(figure)


def train(cfg: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Train as configured by conf/train_model.yaml; returns the last epoch's metrics and paths.

    ``tags`` are set on the MLflow run (a sweep's trial number and study name).

    Raises TrackingError when setup_mlflow is on and MLflow cannot be used (before any training),
    kiln.TrainingError when the loss diverges, FileNotFoundError/ValueError for bad data or config.
    The MLflow run of a failed or interrupted job is ended FAILED/KILLED; its last checkpoint stays.
    """
    import kiln

    device = resolve_device(bool(cfg.get("no_cuda", True)))
    precision = resolve_precision(str(cfg.get("precision", "auto")), device)
    # The dataset is loaded before MLflow is touched: a wrong data_dir_path leaves no failed run behind.
    trainer = kiln.Trainer(
        Path(cfg["data_dir_path"]),
        model=str(cfg.get("model", "mnist_cnn")),
        lr=float(cfg["lr"]),
        gamma=float(cfg.get("gamma", 0.7)),
        train_batch_size=int(cfg["train_bs"]),
        test_batch_size=int(cfg["test_bs"]),
        seed=int(cfg.get("seed", 1)),
        device=device,
        precision=precision,
        train_limit=int(cfg.get("train_limit") or 0),
        test_limit=int(cfg.get("test_limit") or 0),
    )
    tracking = bool(cfg.get("setup_mlflow", False))
    uri = cfg.get("mlflow_tracking_uri")
    status, run, step_offset = general_utils.mlflow_init(
        uri,
        cfg.get("mlflow_exp_name"),
        cfg.get("mlflow_run_name", "train-model"),
        setup_mlflow=tracking,
        autolog=bool(cfg.get("mlflow_autolog", False)),
        resume=bool(cfg.get("resume", False)),
    )
    if tracking and not status:
        raise TrackingError(
            f"setup_mlflow=true but MLflow could not be set up with tracking URI {uri} (reason logged "
            "above); fix mlflow_tracking_uri or set setup_mlflow=false to train untracked"
        )
    mlflow_log(status, "set_tags", tags=dict(tags or {}))
    try:
        return _train(cfg, trainer, precision, status, run, step_offset)
    except BaseException as error:
        if status:
            import mlflow

            failed = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            mlflow_log(status, "set_tag", key="kiln.error", value=f"{type(error).__name__}: {error}"[:5000])
            mlflow.end_run(status=failed)
        raise


def _train(cfg, trainer, precision, status, run, step_offset) -> dict[str, Any]:
    import mlflow

    run_id = run.info.run_id if run is not None else None
    artifact_dir = Path(cfg.get("artifact_dir_path", "./models"))
    checkpoint = artifact_dir / run_id / CHECKPOINT_NAME if run_id else artifact_dir / CHECKPOINT_NAME
    resumed = False
    if cfg.get("resume", False):
        found = _find_checkpoint(checkpoint, run_id if status and step_offset > 0 else None)
        if found is not None:
            trainer.load_checkpoint(found)
            resumed = True
            logger.info("Resumed from %s at epoch %d", found, trainer.epoch)
            # A job killed between writing its checkpoint and logging that epoch: log it now.
            for epoch_metrics in trainer.history:
                if epoch_metrics["epoch"] > step_offset:
                    mlflow_log(
                        status,
                        "log_metrics",
                        metrics=_metrics(epoch_metrics),
                        step=epoch_metrics["epoch"],
                    )
            if step_offset > trainer.epoch:
                logger.warning(
                    "MLflow run has steps up to %d but the checkpoint is at epoch %d; "
                    "epochs %d..%d will be logged again",
                    step_offset,
                    trainer.epoch,
                    trainer.epoch + 1,
                    step_offset,
                )
        else:
            logger.warning(
                "resume=true but no checkpoint found at %s; training starts from scratch",
                checkpoint,
            )
            if status and step_offset > 0:
                mlflow.end_run()
                run = general_utils.start_mlflow_run(
                    general_utils.run_base_name(cfg.get("mlflow_run_name", "train-model"))
                )
                run_id = run.info.run_id
                checkpoint = artifact_dir / run_id / CHECKPOINT_NAME

    if not resumed:
        mlflow_log(
            status,
            "log_params",
            params={
                "learning_rate": cfg["lr"],
                "train_batch_size": cfg["train_bs"],
                "test_batch_size": cfg["test_bs"],
                "model": trainer.model_name,
                "seed": cfg.get("seed", 1),
                "device": trainer.device,
                "precision": precision,
                "epochs": cfg["epochs"],
            },
        )
        config = cfg if isinstance(cfg, dict) else _to_container(cfg)
        mlflow_log(status, "log_dict", dictionary=config, artifact_file="train_model_config.json")
    logger.info(
        "Training %s on %d images (%d test) for %d epoch(s) on %s, %s, lr %s, batch %s",
        trainer.model_name,
        trainer.train_size,
        trainer.test_size,
        cfg["epochs"],
        trainer.device,
        precision,
        cfg["lr"],
        cfg["train_bs"],
    )

    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    epoch_metrics: dict[str, float] = {}
    for _ in range(int(cfg["epochs"])):
        bar = ProgressBar(f"Epoch {trainer.epoch + 1}", unit="batch")
        try:
            epoch_metrics = trainer.run_epoch(progress=bar)
        finally:
            bar.close()
        # Checkpoint before logging: a job killed in between re-logs this epoch when resumed.
        trainer.save_checkpoint(checkpoint)
        mlflow_log(status, "log_metrics", metrics=_metrics(epoch_metrics), step=epoch_metrics["epoch"])
        mlflow_log(
            status,
            "log_artifact",
            local_path=str(checkpoint),
            artifact_path=CHECKPOINT_ARTIFACT_DIR,
        )
        logger.info(
            "Epoch %d: train loss %.4f, train accuracy %.4f, test loss %.4f, test accuracy %.4f (%.1fs)",
            epoch_metrics["epoch"],
            epoch_metrics["train_loss"],
            epoch_metrics["train_accuracy"],
            epoch_metrics["test_loss"],
            epoch_metrics["test_accuracy"],
            epoch_metrics["seconds"],
        )

    if status and trainer.history:
        _log_plots(trainer)
        _log_model_safely(trainer, checkpoint)
        mlflow.end_run()
    last = epoch_metrics or (trainer.history[-1] if trainer.history else {})
    return {
        "test_loss": float(last.get("test_loss", float("nan"))),
        "test_accuracy": float(last.get("test_accuracy", float("nan"))),
        "epoch": trainer.epoch,
        "run_id": run_id,
        "checkpoint": str(checkpoint),
    }


def _log_model_safely(trainer, checkpoint: Path) -> None:
    try:
        _log_model(trainer, checkpoint)
    except Exception as error:  # a tracking error never fails a finished training
        logger.error("Logging the MLflow model failed: %s", error)


def _to_container(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)
