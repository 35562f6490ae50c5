"""Training behind ``python src/train_model.py``.

Every epoch is computed by kiln's C++ trainer; this module wires the Hydra config to it, tracks the
run in MLflow (params, per-epoch metrics, config, checkpoint, plots, a pyfunc model) and resumes
interrupted runs.

Under ``torchrun`` the same function runs in every worker and trains one model data-parallel
(:mod:`kiln.distributed`): rank 0 alone opens the MLflow run, writes checkpoints and logs; every
rank resumes from the checkpoint rank 0 names. A worker restarted by torchrun (``--max-restarts``)
resumes the job's run from its last checkpoint and trains up to the epoch the job set out to reach.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import custom_model, loader, tracking
from kiln import distributed as dp
from kiln import pretrained as kiln_pretrained
from kiln.distributed import Distributed
from kiln.precision import resolve_device, resolve_precision
from kiln.progress import ProgressBar
from kiln.tracking import CHECKPOINT_ARTIFACT_DIR, SweepTrial, Tracking, TrackingError

if TYPE_CHECKING:
    from kiln._core import Trainer

logger = logging.getLogger(__name__)

# The epoch a torchrun job set out to reach; its restarted workers train up to it.
TARGET_EPOCH_TAG = "kiln.target_epoch"


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

    device = dp.training_device(resolve_device(bool(cfg["no_cuda"])))
    group = dp.from_environment(device, str(cfg["dist_backend"]), float(cfg["dist_timeout_s"]))
    dp.quiet_other_ranks(group)
    # precision=auto may time bf16 against fp32 on this machine: every rank trains in rank 0's choice.
    choose_precision = partial(resolve_precision, str(cfg["precision"]), device)
    precision = choose_precision() if group is None else group.from_rank0(choose_precision, "choosing the precision")
    if group is not None:
        # Every rank checks its own data first: one rank's missing dir fails every rank at once, by name.
        group.check_everywhere(lambda: kiln.read_manifest(Path(cfg["data_dir_path"])), "loading data_dir_path")
    # pretrained: is resolved (and found) before anything else is touched, like the dataset below.
    pretrained = cfg["pretrained"]
    pretrained_file = kiln_pretrained.resolve(str(pretrained)) if pretrained else None
    normalization = _normalization(pretrained_file, Path(cfg["data_dir_path"]))
    if custom_model.is_custom(str(cfg["model"])):
        # model=python:<module>:<callable> is compiled to TorchScript before the trainer starts.
        custom_model.register(str(cfg["model"]), Path(cfg["data_dir_path"]), int(cfg["seed"]))
    train_transform, eval_transform = loader.transform_options(cfg["transforms"])
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
        process_group=group.group_name if group is not None else "",
        freeze=str(cfg["freeze"]),
        optimizer=str(cfg["optimizer"]),
        momentum=float(cfg["momentum"]) if str(cfg["optimizer"]) == "sgd" else 0.0,
        nesterov=bool(cfg["nesterov"]),
        weight_decay=float(cfg["weight_decay"]),
        data_memory_budget=loader.data_memory_budget(cfg["data_memory_budget"]),
        num_workers=int(cfg["num_workers"]),
        train_transform=train_transform,
        eval_transform=eval_transform,
        **normalization,
    )
    # A worker torchrun restarted goes on with the job's run, from its last checkpoint.
    resume = bool(cfg["resume"]) or dp.restart_count() > 0
    if group is None:
        run = _start_tracking(cfg, trial, resume)
    else:
        run = group.from_rank0(lambda: _start_tracking(cfg, trial, resume), "setting up MLflow", share=_replica)
    # From the config, not the run: in a data-parallel job only rank 0 holds the tracked run.
    artifact_dir = tracking.job_artifact_dir(Path(cfg["artifact_dir_path"]), bool(cfg["setup_mlflow"]), trial)
    try:
        return _train(cfg, trainer, precision, run, artifact_dir, resume, group, pretrained_file)
    except BaseException as error:
        tracking.end_failed(run, error)
        raise


def _replica(run: Tracking) -> Tracking:
    """Rank 0's run as the other ranks hold it: its id and step offset, never tracked (rank 0 logs)."""
    return tracking.Tracking(
        tracked=False, step_offset=run.step_offset, base_name=run.base_name, rank0_run_id=run.run_id
    )


def _start_tracking(cfg: Mapping[str, Any], trial: SweepTrial | None, resume: bool) -> Tracking:
    if not cfg["setup_mlflow"]:
        return tracking.UNTRACKED
    uri = cfg["mlflow_tracking_uri"]
    run = tracking.open_run(
        uri,
        cfg["mlflow_exp_name"],
        cfg["mlflow_run_name"],
        autolog=bool(cfg["mlflow_autolog"]),
        resume=resume,
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


def _normalization(pretrained_file: Path | None, data_dir: Path) -> dict[str, list[float]]:
    """Trainer's mean/std: with pretrained weights, the weights' (ImageNet's; for data with other
    channel counts, their channel averages, as the stem's weights are summed or spread); else none
    given, so the manifest's."""
    if pretrained_file is None:
        return {}
    import kiln

    channels = kiln.read_manifest(data_dir).image.channels
    if channels == 3:
        return {"mean": list(kiln_pretrained.IMAGENET_MEAN), "std": list(kiln_pretrained.IMAGENET_STD)}
    mean = sum(kiln_pretrained.IMAGENET_MEAN) / 3
    std = sum(kiln_pretrained.IMAGENET_STD) / 3
    return {"mean": [mean] * channels, "std": [std] * channels}


def _start_from_pretrained(trainer: Trainer, pretrained_file: Path) -> None:
    state = kiln_pretrained.read_state_dict(pretrained_file)
    adaptations = trainer.load_pretrained(state, f"pretrained weights '{pretrained_file}'")
    logger.info("Starting %s from pretrained weights %s", trainer.model_name, pretrained_file)
    for adaptation in adaptations:
        logger.info("Pretrained weights: %s", adaptation)


def _train(
    cfg: Mapping[str, Any],
    trainer: Trainer,
    precision: str,
    run: Tracking,
    artifact_dir: Path,
    resume: bool,
    group: Distributed | None,
    pretrained_file: Path | None = None,
) -> dict[str, Any]:
    if group is None:
        run, resumed = _resume(trainer, run, artifact_dir, resume)
    else:
        # Rank 0 decides where to resume from (its run, its checkpoint); every rank loads that file.
        run, found = _resume_everywhere(trainer, run, artifact_dir, resume, group)
        resumed = found is not None
    if not resumed:
        if pretrained_file is not None:
            _start_from_pretrained(trainer, pretrained_file)
        _log_params(cfg, trainer, precision, run)
    checkpoint = tracking.local_checkpoint(artifact_dir, run.run_id)
    logger.info("Checkpoints go to %s", checkpoint)
    epochs = _epochs_to_train(cfg, trainer, run, checkpoint, group)
    epoch_metrics = _train_epochs(cfg, trainer, precision, run, checkpoint, epochs, group)
    return _finish(trainer, run, checkpoint, epoch_metrics)


def _resume_everywhere(
    trainer: Trainer, run: Tracking, artifact_dir: Path, resume: bool, group: Distributed
) -> tuple[Tracking, Path | None]:
    """:func:`_resume` for a data-parallel job: rank 0 finds the checkpoint (and may start a new run),
    sends the file to ranks that lack it, and every rank loads it."""

    def decide() -> tuple[Tracking, str | None]:
        decided, found = _find_resume_checkpoint(run, artifact_dir, resume)
        return decided, str(found) if found is not None else None

    decided, found = group.from_rank0(
        decide, "finding the checkpoint to resume from", share=lambda result: (_replica(result[0]), result[1])
    )
    if found is None:
        return decided, None
    path = Path(found)
    group.files_from_rank0(path)
    _load(trainer, decided, path)
    return decided, path


def _find_resume_checkpoint(run: Tracking, artifact_dir: Path, resume: bool) -> tuple[Tracking, Path | None]:
    """The checkpoint to resume from, or None (then the run is new or restarted from scratch)."""
    if not resume:
        return run, None
    checkpoint = tracking.local_checkpoint(artifact_dir, run.run_id)
    found = tracking.find_checkpoint(checkpoint, run.run_id if run.tracked and run.step_offset > 0 else None)
    if found is None:
        logger.warning("resume=true but no checkpoint found at %s; training starts from scratch", checkpoint)
        if run.tracked and run.step_offset > 0:
            run = tracking.restart_run(run)
    return run, found


def _resume(trainer: Trainer, run: Tracking, artifact_dir: Path, resume: bool) -> tuple[Tracking, bool]:
    """With resume=true, load the run's last checkpoint into ``trainer`` (True), or, with none, go
    on from scratch, in a new run when the reopened one has steps (False)."""
    run, found = _find_resume_checkpoint(run, artifact_dir, resume)
    if found is None:
        return run, False
    _load(trainer, run, found)
    return run, True


def _load(trainer: Trainer, run: Tracking, found: Path) -> None:
    trainer.load_checkpoint(found)
    logger.info("Resumed from %s at epoch %d", found, trainer.epoch)
    tracking.log_missed_epochs(run, trainer.history, trainer.epoch)


def _epochs_to_train(
    cfg: Mapping[str, Any], trainer: Trainer, run: Tracking, checkpoint: Path, group: Distributed | None
) -> int:
    """``epochs``; for a worker torchrun restarted, the epochs left to the epoch its job set out to
    reach (recorded by rank 0 when the job started: the run's tag kiln.target_epoch, or a file beside
    the checkpoint when untracked)."""
    epochs = int(cfg["epochs"])
    if group is None:
        return epochs

    def target() -> int:
        marker = checkpoint.with_name("target_epoch")
        if dp.restart_count() == 0:
            goal = trainer.epoch + epochs
            run.log("set_tag", key=TARGET_EPOCH_TAG, value=str(goal))
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{goal}\n")
            return goal
        recorded = tracking.run_tag(run, TARGET_EPOCH_TAG) if run.tracked else None
        if recorded is None and marker.is_file():
            recorded = marker.read_text().strip()
        return int(recorded) if recorded else trainer.epoch + epochs

    goal = group.from_rank0(target, "deciding the epochs to train")
    if dp.restart_count() > 0:
        logger.warning(
            "Restarted by torchrun (restart %d): training epochs %d..%d", dp.restart_count(), trainer.epoch + 1, goal
        )
    return max(0, goal - trainer.epoch)


def _log_params(cfg: Mapping[str, Any], trainer: Trainer, precision: str, run: Tracking) -> None:
    run.log(
        "log_params",
        params={
            "learning_rate": cfg["lr"],
            "train_batch_size": cfg["train_bs"],
            "test_batch_size": cfg["test_bs"],
            "model": trainer.model_name,
            "pretrained": cfg["pretrained"] or "none",
            "freeze": cfg["freeze"],
            "optimizer": cfg["optimizer"],
            "weight_decay": cfg["weight_decay"],
            "seed": cfg["seed"],
            "device": trainer.device,
            "precision": precision,
            "epochs": cfg["epochs"],
            "world_size": trainer.world_size,
        },
    )
    config = cfg if isinstance(cfg, dict) else _to_container(cfg)
    run.log("log_dict", dictionary=config, artifact_file="train_model_config.json")


def _train_epochs(
    cfg: Mapping[str, Any],
    trainer: Trainer,
    precision: str,
    run: Tracking,
    checkpoint: Path,
    epochs: int,
    group: Distributed | None,
) -> dict[str, float]:
    """``epochs`` more epochs; each is checkpointed (by rank 0), then logged. Returns the last one's metrics."""
    logger.info(
        "Training %s on %d images (%d test, %s) for %d epoch(s) on %s, %s, lr %s, batch %s%s",
        trainer.model_name,
        trainer.train_size,
        trainer.test_size,
        "streamed from the shards: over data_memory_budget" if trainer.streams_data else "resident",
        epochs,
        trainer.device,
        precision,
        cfg["lr"],
        cfg["train_bs"],
        f" per rank, {trainer.world_size} ranks ({group.backend})" if group is not None else "",
    )
    writes = group is None or group.is_main
    if writes:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    on_steps = partial(tracking.log_steps, run) if run.tracked and cfg["mlflow_autolog"] else None
    # The trainer reports batches; the bar counts this rank's images (its share of the padded epoch).
    rank_images = -(-trainer.train_size // trainer.world_size)
    epoch_metrics: dict[str, float] = {}
    for _ in range(epochs):
        # Other ranks show no bar; their callback still lets Ctrl-C stop the epoch.
        bar = (
            ProgressBar(
                f"Epoch {trainer.epoch + 1}",
                unit="img",
                postfix=lambda: _data_wait_postfix(trainer),
                batch_size=int(cfg["train_bs"]),
                units_total=rank_images,
            )
            if writes
            else _SilentProgress()
        )
        try:
            epoch_metrics = trainer.run_epoch(bar, on_steps=on_steps, every_n_steps=int(cfg["log_every_n_steps"]))
        finally:
            bar.close()
        if not writes:
            continue
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


def _data_wait_postfix(trainer: Trainer) -> str:
    """The bar's note of how long the loop has waited on the loader this epoch (none while it never has)."""
    waited = trainer.data_wait_seconds
    return f"data wait {waited:.1f}s" if waited >= 0.05 else ""


class _SilentProgress:
    def __call__(self, done: int, total: int) -> None:
        pass

    def close(self) -> None:
        pass


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
