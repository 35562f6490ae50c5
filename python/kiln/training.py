"""Training behind ``python src/train_model.py``.

Every epoch is computed by kiln's C++ trainer; this module wires the Hydra config to it, tracks the
run in MLflow (params, per-epoch metrics, config, checkpoint, plots, a pyfunc model) and resumes
interrupted runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import tracking
from kiln.precision import resolve_device, resolve_precision
from kiln.progress import ProgressBar
from kiln.tracking import CHECKPOINT_ARTIFACT_DIR, SweepTrial, Tracking, TrackingError

if TYPE_CHECKING:
    from kiln._core import Trainer

logger = logging.getLogger(__name__)


def _log_model(trainer: Trainer, checkpoint: Path) -> None:
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    import kiln

    channels, height, width = trainer.image_shape
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, channels, height, width))]))
    # The signature is explicit: MLflow infers none from predict()'s np.ndarray hint (kiln.mlflow_model).
    mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(kiln.__file__).with_name("mlflow_model.py")),
        artifacts={"checkpoint": str(checkpoint)},
        signature=signature,
        input_example=np.zeros((1, channels, height, width), dtype=np.uint8),
        pip_requirements=["torch==2.13.0", f"kiln-mlops=={kiln.__version__}"],
    )


def _log_plots(trainer: Trainer) -> None:
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


def train(cfg: Mapping[str, Any], trial: SweepTrial | None = None) -> dict[str, Any]:
    """Train as configured by conf/train_model.yaml; returns the last epoch's metrics and paths.

    ``cfg`` holds every key of conf/train_model.yaml (compose it with Hydra to call this from
    Python). ``trial`` is the sweep trial this job is: it groups the run (``-hp`` name,
    ``hptuning_tag``) and tags it with the trial number and study name.

    Raises TrackingError when setup_mlflow is on and MLflow cannot be used (before any training),
    kiln.TrainingError when the loss diverges, FileNotFoundError/ValueError for bad data or config.
    The MLflow run of a failed or interrupted job is ended FAILED/KILLED; its last checkpoint stays.
    """
    import kiln

    device = resolve_device(bool(cfg["no_cuda"]))
    precision = resolve_precision(str(cfg["precision"]), device)
    # The dataset is loaded before MLflow is touched: a wrong data_dir_path leaves no failed run behind.
    trainer = kiln.Trainer(
        Path(cfg["data_dir_path"]),
        model=str(cfg["model"]),
        lr=float(cfg["lr"]),
        gamma=float(cfg["gamma"]),
        train_batch_size=int(cfg["train_bs"]),
        test_batch_size=int(cfg["test_bs"]),
        seed=int(cfg["seed"]),
        device=device,
        precision=precision,
        train_limit=int(cfg["train_limit"] or 0),
        test_limit=int(cfg["test_limit"] or 0),
    )
    run = _start_tracking(cfg, trial)
    try:
        return _train(cfg, trainer, precision, run)
    except BaseException as error:
        tracking.end_failed(run, error)
        raise


def _start_tracking(cfg: Mapping[str, Any], trial: SweepTrial | None) -> Tracking:
    if not cfg["setup_mlflow"]:
        return tracking.UNTRACKED
    uri = cfg["mlflow_tracking_uri"]
    run = tracking.open_run(
        uri,
        cfg["mlflow_exp_name"],
        cfg["mlflow_run_name"],
        autolog=bool(cfg["mlflow_autolog"]),
        resume=bool(cfg["resume"]),
        hptuning_tag=trial.hptuning_tag if trial is not None else None,
    )
    if not run.tracked:
        raise TrackingError(
            f"setup_mlflow=true but MLflow could not be set up with tracking URI {uri} (reason logged "
            "above); fix mlflow_tracking_uri or set setup_mlflow=false to train untracked"
        )
    if trial is not None:
        run.log("set_tags", tags=trial.tags)
    return run


def _train(cfg: Mapping[str, Any], trainer: Trainer, precision: str, run: Tracking) -> dict[str, Any]:
    artifact_dir = Path(cfg["artifact_dir_path"])
    run, resumed = _resume(cfg, trainer, run, artifact_dir)
    if not resumed:
        _log_params(cfg, trainer, precision, run)
    checkpoint = tracking.local_checkpoint(artifact_dir, run.run_id)
    epoch_metrics = _train_epochs(cfg, trainer, precision, run, checkpoint)
    return _finish(trainer, run, checkpoint, epoch_metrics)


def _resume(cfg: Mapping[str, Any], trainer: Trainer, run: Tracking, artifact_dir: Path) -> tuple[Tracking, bool]:
    """With resume=true, load the run's last checkpoint into ``trainer`` (True), or, with none, go
    on from scratch, in a new run when the reopened one has steps (False)."""
    if not cfg["resume"]:
        return run, False
    checkpoint = tracking.local_checkpoint(artifact_dir, run.run_id)
    found = tracking.find_checkpoint(checkpoint, run.run_id if run.tracked and run.step_offset > 0 else None)
    if found is None:
        logger.warning("resume=true but no checkpoint found at %s; training starts from scratch", checkpoint)
        if run.tracked and run.step_offset > 0:
            run = tracking.restart_run(run)
        return run, False
    trainer.load_checkpoint(found)
    logger.info("Resumed from %s at epoch %d", found, trainer.epoch)
    tracking.log_missed_epochs(run, trainer.history, trainer.epoch)
    return run, True


def _log_params(cfg: Mapping[str, Any], trainer: Trainer, precision: str, run: Tracking) -> None:
    run.log(
        "log_params",
        params={
            "learning_rate": cfg["lr"],
            "train_batch_size": cfg["train_bs"],
            "test_batch_size": cfg["test_bs"],
            "model": trainer.model_name,
            "seed": cfg["seed"],
            "device": trainer.device,
            "precision": precision,
            "epochs": cfg["epochs"],
        },
    )
    config = cfg if isinstance(cfg, dict) else _to_container(cfg)
    run.log("log_dict", dictionary=config, artifact_file="train_model_config.json")


def _train_epochs(
    cfg: Mapping[str, Any], trainer: Trainer, precision: str, run: Tracking, checkpoint: Path
) -> dict[str, float]:
    """``epochs`` more epochs; each is checkpointed, then logged. Returns the last one's metrics."""
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
    on_steps = partial(tracking.log_steps, run) if run.tracked and cfg["mlflow_autolog"] else None
    epoch_metrics: dict[str, float] = {}
    for _ in range(int(cfg["epochs"])):
        bar = ProgressBar(f"Epoch {trainer.epoch + 1}", unit="batch")
        try:
            epoch_metrics = trainer.run_epoch(bar, on_steps=on_steps, every_n_steps=int(cfg["log_every_n_steps"]))
        finally:
            bar.close()
        # Checkpoint before logging: a job killed in between re-logs this epoch when resumed.
        trainer.save_checkpoint(checkpoint)
        tracking.log_epoch(run, epoch_metrics)
        run.log("log_artifact", local_path=str(checkpoint), artifact_path=CHECKPOINT_ARTIFACT_DIR)
        logger.info(
            "Epoch %d: train loss %.4f, train accuracy %.4f, test loss %.4f, test accuracy %.4f (%.1fs)",
            epoch_metrics["epoch"],
            epoch_metrics["train_loss"],
            epoch_metrics["train_accuracy"],
            epoch_metrics["test_loss"],
            epoch_metrics["test_accuracy"],
            epoch_metrics["seconds"],
        )
    return epoch_metrics


def _finish(trainer: Trainer, run: Tracking, checkpoint: Path, epoch_metrics: Mapping[str, float]) -> dict[str, Any]:
    """Log the plots and the pyfunc model, end the run; the result ``train`` returns."""
    if run.tracked and trainer.history:
        import mlflow

        _log_plots(trainer)
        _log_model_safely(trainer, checkpoint)
        mlflow.end_run()
    last = epoch_metrics or (trainer.history[-1] if trainer.history else {})
    return {
        "test_loss": float(last.get("test_loss", float("nan"))),
        "test_accuracy": float(last.get("test_accuracy", float("nan"))),
        "epoch": trainer.epoch,
        "run_id": run.run_id,
        "checkpoint": str(checkpoint),
    }


def _log_model_safely(trainer: Trainer, checkpoint: Path) -> None:
    try:
        _log_model(trainer, checkpoint)
    except Exception as error:  # a tracking error never fails a finished training
        logger.error("Logging the MLflow model failed: %s", error)


def _to_container(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)
