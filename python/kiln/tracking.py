"""MLflow tracking of a training job, and resuming it.

Everything kiln does with MLflow around a training run lives here:

- opening the run (:func:`open_run`): tracking URI, experiment, a run named ``{run_name}-{unix time}``
  (``{run_name}-hp-{unix time}`` in hyperparameter tuning) tagged ``hptuning_tag``, ``job_uuid`` and
  ``job_name``; under ``mlflow run``, the run MLflow Projects started;
- resuming: the newest run of that name and the last step of kiln's metrics in it
  (:func:`latest_run_named`, :func:`last_logged_step`), its checkpoint, local or downloaded from the
  run (:func:`find_checkpoint`), the epochs a killed job checkpointed but did not log
  (:func:`log_missed_epochs`), and a new run when that run left no checkpoint (:func:`restart_run`);
- a sweep trial's grouping tag and tags (:class:`SweepTrial`), the tag fixed at the sweep's start by
  the Hydra callback :class:`RecordSweepStart`;
- where a job's checkpoint goes (:func:`job_artifact_dir`, :func:`local_checkpoint`).

The environment variables ``MLFLOW_HPTUNING_TAG``, ``JOB_UUID``, ``JOB_NAME`` and ``MLFLOW_RUN_ID``
are the user's input: kiln reads them and never writes them; what kiln hands over itself (a sweep's
group tag) is an argument, or a file in the sweep's dir. :mod:`kiln.general_utils` keeps the
template's ``mlflow_init`` and ``mlflow_log`` on top of this module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from hydra.experimental.callback import Callback

if TYPE_CHECKING:
    import mlflow
    from mlflow.entities import Run
    from omegaconf import DictConfig

logger = logging.getLogger(__name__)

# kiln's own per-epoch metrics; resume offsets steps by these only (system/* metrics count on their own).
TRAINING_METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
CHECKPOINT_NAME = "checkpoint.pt"
# The run's artifact folder that holds the latest checkpoint, re-logged after every epoch.
CHECKPOINT_ARTIFACT_DIR = "checkpoint"


class TrackingError(RuntimeError):
    """MLflow tracking was asked for but cannot be used (unreachable server, bad URI, ...)."""


@dataclass(frozen=True)
class Tracking:
    """A training job's MLflow state.

    ``tracked`` is False when tracking is off (``setup_mlflow=false``) or could not be set up; then
    :meth:`log` does nothing. ``step_offset`` is the last step a resumed run had logged (0 for a new
    run); ``base_name`` the run's name without its time, ``hptuning_tag`` its group in a sweep. In a
    data-parallel job the ranks other than 0 hold no run and log nothing: ``rank0_run_id`` is rank
    0's run, whose checkpoint path they share.
    """

    tracked: bool
    run: mlflow.ActiveRun | None = None
    step_offset: int = 0
    base_name: str = ""
    hptuning_tag: str | None = None
    rank0_run_id: str | None = None

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run is not None else self.rank0_run_id

    def log(self, log_function: str, **kwargs: Any) -> None:
        """``mlflow.<log_function>(**kwargs)`` when tracked; see :func:`log`."""
        log(self.tracked, log_function, **kwargs)


UNTRACKED = Tracking(tracked=False)


# The file in a sweep's dir that holds its hptuning_tag, written by RecordSweepStart before any trial runs.
HPTUNING_TAG_FILE = "hptuning_tag"


def _sweep_dir(hydra_config: DictConfig) -> Path:
    """The sweep's output dir as an absolute path: a relative ``hydra.sweep.dir`` is relative to the
    dir the command ran in (``hydra.runtime.cwd``), wherever a trial's own working dir is."""
    from omegaconf import OmegaConf

    directory = Path(str(hydra_config.sweep.dir))
    cwd = OmegaConf.select(hydra_config, "runtime.cwd", default=None)
    return directory if directory.is_absolute() else Path(cwd or os.getcwd()) / directory


class RecordSweepStart(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/train_model.yaml) that fixes a sweep's ``hptuning_tag``
    before any trial runs: ``$MLFLOW_HPTUNING_TAG`` when the user set it, else the sweep's start in epoch
    seconds (as the template's guides describe the tag), written to ``<sweep dir>/hptuning_tag``.

    Trials read it back from there (:meth:`SweepTrial.from_hydra`): Hydra runs this in the process that
    launches the sweep, and every trial, in that process or in a joblib worker process, is given the
    same sweep dir; Hydra composes each trial's config afresh, so a value set in the launching
    process's config would not reach them. Each ``--multirun`` invocation is a new sweep and writes a
    new tag.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        directory = _sweep_dir(config.hydra)
        directory.mkdir(parents=True, exist_ok=True)
        tag = os.environ.get("MLFLOW_HPTUNING_TAG") or str(int(time.time()))
        partial = directory / f".{HPTUNING_TAG_FILE}.{os.getpid()}"
        partial.write_text(tag + "\n")
        os.replace(partial, directory / HPTUNING_TAG_FILE)  # a trial never reads half a tag
        logger.info("Sweep's hptuning_tag: %s (in %s)", tag, directory / HPTUNING_TAG_FILE)


@dataclass(frozen=True)
class SweepTrial:
    """One trial of a ``--multirun`` sweep, as its MLflow run is grouped and tagged."""

    hptuning_tag: str  # groups the sweep's runs (tag hptuning_tag, -hp in the run name)
    number: int
    study_name: str | None = None
    sweep_dir: str | None = None  # the sweep's output dir (tag hptuning_dir)

    @classmethod
    def from_hydra(cls, hydra_config: DictConfig) -> SweepTrial:
        """The trial Hydra is running (``HydraConfig.get()``). Its group is ``$MLFLOW_HPTUNING_TAG``
        when the user set it, else the sweep's start in epoch seconds, fixed by
        :class:`RecordSweepStart` in ``<sweep dir>/hptuning_tag``: the same for every trial, also in
        parallel worker processes. Without that file (the callback left out of the config) the sweep's
        dir groups the trials instead, with a warning."""
        from omegaconf import OmegaConf

        study_name = OmegaConf.select(hydra_config, "sweeper.study_name")
        sweep_dir = str(hydra_config.sweep.dir)
        tag = os.environ.get("MLFLOW_HPTUNING_TAG")
        if not tag:
            recorded = _sweep_dir(hydra_config) / HPTUNING_TAG_FILE
            try:
                tag = recorded.read_text().strip()
            except OSError:
                logger.warning(
                    "%s not found (kiln.tracking.RecordSweepStart is not among hydra.callbacks); "
                    "the sweep's runs are grouped by its dir %s instead",
                    recorded,
                    sweep_dir,
                )
                tag = sweep_dir
        return cls(
            hptuning_tag=tag,
            number=int(hydra_config.job.num),
            study_name=str(study_name) if study_name else None,
            sweep_dir=sweep_dir,
        )

    @property
    def tags(self) -> dict[str, str]:
        """The trial's own tags: ``trial_number`` and, when known, ``study_name`` and ``hptuning_dir``
        (the sweep's output dir)."""
        tags = {"trial_number": str(self.number)}
        if self.study_name:
            tags["study_name"] = self.study_name
        if self.sweep_dir:
            tags["hptuning_dir"] = self.sweep_dir
        return tags


def log(tracked: bool, log_function: str, **kwargs: Any) -> None:
    """Call ``mlflow.<log_function>(**kwargs)`` when ``tracked``.

    A tracking error is logged and never stops training, as in the template.
    """
    if not tracked:
        return
    try:
        import mlflow

        getattr(mlflow, log_function)(**kwargs)
    except Exception as error:
        logger.error("mlflow.%s failed: %s", log_function, error)


def _is_local_store(tracking_uri: str) -> bool:
    return urlparse(str(tracking_uri)).scheme in ("", "file")


def allow_local_file_store(tracking_uri: str) -> bool:
    """Let MLflow 3 use a local file store (kiln's ``./mlruns`` default), which it refuses unless
    ``MLFLOW_ALLOW_FILE_STORE=true``; other URIs are left alone. Returns whether the URI is local."""
    local = _is_local_store(tracking_uri)
    if local:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return local


def check_tracking_server(tracking_uri: str, timeout: float = 10.0) -> None:
    """Fail fast, naming the URI, instead of MLflow's minutes of retries against a dead server."""
    url = str(tracking_uri).rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status != 200:
                raise TrackingError(f"MLflow tracking server {tracking_uri} answered {response.status} on /health")
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingError(f"MLflow tracking server {tracking_uri} is unreachable: {reason}") from error


def run_base_name(run_name: str, hptuning_tag: str | None) -> str:
    """The template's naming: ``-hp`` is appended for hyperparameter-tuning jobs."""
    return f"{run_name}-hp" if hptuning_tag is not None else run_name


def job_tags(hptuning_tag: str | None) -> dict[str, str]:
    """``hptuning_tag``, and ``job_uuid`` / ``job_name`` from ``$JOB_UUID`` / ``$JOB_NAME``; unset or
    empty ones are left out."""
    tags = {
        "hptuning_tag": hptuning_tag,
        "job_uuid": os.environ.get("JOB_UUID"),
        "job_name": os.environ.get("JOB_NAME"),
    }
    return {key: value for key, value in tags.items() if value}


def start_run(base_name: str, hptuning_tag: str | None, run_id: str | None = None) -> mlflow.ActiveRun:
    """Start (or, with ``run_id``, take over) a run named ``{base_name}-{unix time}``, with :func:`job_tags`."""
    import mlflow

    run = mlflow.start_run(run_id=run_id, run_name=f"{base_name}-{int(time.time())}")
    mlflow.set_tags(job_tags(hptuning_tag))
    return run


def set_experiment(name: str) -> Any:
    """``mlflow.set_experiment(name)``, safe when parallel trials create the experiment at once: with
    MLflow 3.17 the loser of that race went on to log into the Default experiment."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # Another process may create it in the meantime; either way it is read back below.
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.create_experiment(name)
        experiment = client.get_experiment_by_name(name)
    return mlflow.set_experiment(experiment_id=experiment.experiment_id)


def latest_run_named(client: mlflow.MlflowClient, experiment_id: str, base_name: str) -> Run | None:
    """The newest run called ``{base_name}-{unix time}`` (not ``{base_name}-hp-...``)."""
    pattern = re.compile(re.escape(base_name) + r"-\d+$")
    runs = client.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.mlflow.runName LIKE '{base_name}-%'",
        order_by=["attributes.start_time DESC"],
        max_results=200,
    )
    return next((run for run in runs if pattern.match(run.data.tags.get("mlflow.runName", ""))), None)


def last_logged_step(client: mlflow.MlflowClient, run_id: str) -> int:
    """The largest step of kiln's training metrics in a run (0 if none)."""
    steps = [m.step for key in TRAINING_METRICS for m in client.get_metric_history(run_id, key)]
    return max(steps, default=0)


def _reopen_latest_run(exp_name: str, experiment_id: str, base_name: str) -> tuple[mlflow.ActiveRun, int] | None:
    """Reopen the newest run of ``base_name``: the run and the last step it logged; None if none."""
    import mlflow

    client = mlflow.MlflowClient()
    previous = latest_run_named(client, experiment_id, base_name)
    if previous is None:
        logger.warning(
            "resume=true but experiment %r has no run named %s-<time>; starting a new run",
            exp_name,
            base_name,
        )
        return None
    run = mlflow.start_run(run_id=previous.info.run_id)
    step_offset = last_logged_step(client, previous.info.run_id)
    logger.info(
        "Resuming MLflow run %s (%s) after step %d",
        previous.data.tags.get("mlflow.runName"),
        previous.info.run_id,
        step_offset,
    )
    return run, step_offset


def open_run(
    tracking_uri: str, exp_name: str, run_name: str, *, autolog: bool, resume: bool, hptuning_tag: str | None
) -> Tracking:
    """Set up MLflow for a training job and open its run, as the template's ``mlflow_init`` does.

    Sets the tracking URI and experiment, optionally ``mlflow.autolog()``, and starts a run named
    ``"{run_name}-{unix time}"`` (``"{run_name}-hp-{unix time}"`` with a hyperparameter-tuning tag)
    tagged ``hptuning_tag``, ``job_uuid`` and ``job_name``. The tag is ``hptuning_tag`` when given
    (a sweep's group), else ``$MLFLOW_HPTUNING_TAG`` when set. Under ``mlflow run``
    (``MLFLOW_RUN_ID`` set) it logs into that run and its experiment instead. With ``resume``, the
    newest run of that base name is reopened instead and ``step_offset`` is the largest step of its
    training metrics.

    A local tracking URI (``./mlruns``) is MLflow's file store, which MLflow 3 refuses unless
    ``MLFLOW_ALLOW_FILE_STORE=true``; kiln sets that for it. An ``http(s)`` server is checked
    first, so an unreachable one fails at once with its URI in the message.

    When setting up fails, the result is untracked and the failure is logged as an error (never
    silently turned into untracked training): the caller decides whether to stop.
    """
    if hptuning_tag is None:
        hptuning_tag = os.environ.get("MLFLOW_HPTUNING_TAG")
    planned = Tracking(tracked=True, base_name=run_base_name(run_name, hptuning_tag), hptuning_tag=hptuning_tag)
    try:
        return _open(tracking_uri, exp_name, planned, autolog=autolog, resume=resume)
    except Exception as error:  # reported loudly; the caller stops when tracking was required
        logger.error("MLflow could not be set up with tracking URI %s: %s", tracking_uri, error)
        return UNTRACKED


def _open(tracking_uri: str, exp_name: str, planned: Tracking, *, autolog: bool, resume: bool) -> Tracking:
    """:func:`open_run`'s work; raises on any failure (TrackingError for an unreachable server)."""
    import mlflow

    allow_local_file_store(tracking_uri)
    if urlparse(str(tracking_uri)).scheme in ("http", "https"):
        check_tracking_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    # Under `mlflow run` (MLflow Projects, locally or on Kubernetes) the job logs into the run MLflow
    # started for it, in that run's experiment, instead of a new one.
    project_run_id = None if resume else os.environ.get("MLFLOW_RUN_ID")
    if project_run_id:
        client = mlflow.MlflowClient()
        experiment = client.get_experiment(client.get_run(project_run_id).info.experiment_id)
    else:
        experiment = set_experiment(exp_name)
    if importlib.util.find_spec("psutil") is not None:
        mlflow.enable_system_metrics_logging()  # system/* metrics, as the template logs
    if autolog:
        mlflow.autolog()
    if resume:
        reopened = _reopen_latest_run(exp_name, experiment.experiment_id, planned.base_name)
        if reopened is not None:
            run, step_offset = reopened
            return replace(planned, run=run, step_offset=step_offset)
    if project_run_id:
        # Named as kiln names its runs, so a later resume=true finds it.
        run = start_run(planned.base_name, planned.hptuning_tag, run_id=project_run_id)
        logger.info("Logging into the MLflow Projects run %s (MLFLOW_RUN_ID)", project_run_id)
        return replace(planned, run=run)
    return replace(planned, run=start_run(planned.base_name, planned.hptuning_tag))


def job_artifact_dir(artifact_dir: Path, tracked: bool, trial: SweepTrial | None) -> Path:
    """The folder a job's checkpoint goes to: ``artifact_dir``, except for an untracked trial of a
    ``--multirun`` sweep, which has no run id to keep its checkpoint apart from the other trials':
    ``<artifact_dir>/sweep-<hptuning_tag>/trial-<number>``. The sweep's ``hptuning_tag`` (its start, or
    ``$MLFLOW_HPTUNING_TAG``) keeps sweeps apart too; with the same ``$MLFLOW_HPTUNING_TAG``,
    ``resume=true`` resumes each trial from its own checkpoint."""
    if tracked or trial is None:
        return artifact_dir
    # Without RecordSweepStart the tag is the sweep's dir, a path: one folder name of it.
    sweep = re.sub(r"[^A-Za-z0-9._-]+", "_", trial.hptuning_tag).strip("._") or "sweep"
    return artifact_dir / f"sweep-{sweep}" / f"trial-{trial.number}"


def local_checkpoint(artifact_dir: Path, run_id: str | None) -> Path:
    """Where a run's checkpoint is written: ``<artifact_dir>/<run id>/checkpoint.pt``, or
    ``<artifact_dir>/checkpoint.pt`` untracked."""
    return artifact_dir / run_id / CHECKPOINT_NAME if run_id else artifact_dir / CHECKPOINT_NAME


def find_checkpoint(local: Path, run_id: str | None) -> Path | None:
    """The run's checkpoint: the local copy, else the one logged to run ``run_id`` (another
    machine's), downloaded to ``local``; None when there is neither."""
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


def log_epoch(tracking: Tracking, epoch_metrics: Mapping[str, float]) -> None:
    """Log one epoch's :data:`TRAINING_METRICS` at ``step = epoch``."""
    metrics = {key: float(epoch_metrics[key]) for key in TRAINING_METRICS}
    # How long training waited on the loader (kiln's, not the template's; absent from checkpoints' history).
    if "data_wait_seconds" in epoch_metrics:
        metrics["data_wait_seconds"] = float(epoch_metrics["data_wait_seconds"])
    tracking.log("log_metrics", metrics=metrics, step=epoch_metrics["epoch"])


# What autologging (mlflow_autolog: true) adds to a run while an epoch trains, at step = the model's
# batches so far: the mean training loss and throughput of the last log_every_n_steps batches.
STEP_METRICS = {"loss": "batch_loss", "learning_rate": "learning_rate", "images_per_second": "images_per_second"}


def log_steps(tracking: Tracking, step_metrics: Mapping[str, float]) -> None:
    """Log one report of the C++ trainer's ``on_steps`` (``Trainer.run_epoch``) as :data:`STEP_METRICS`."""
    metrics = {name: float(step_metrics[key]) for key, name in STEP_METRICS.items()}
    tracking.log("log_metrics", metrics=metrics, step=int(step_metrics["step"]))


def log_missed_epochs(tracking: Tracking, history: Iterable[Mapping[str, float]], checkpoint_epoch: int) -> None:
    """Log the epochs of a resumed checkpoint's ``history`` after the run's ``step_offset``: a job
    killed between writing its checkpoint and logging that epoch. Warns when the run logged more
    epochs than the checkpoint holds (those are logged again as training repeats them)."""
    for epoch_metrics in history:
        if epoch_metrics["epoch"] > tracking.step_offset:
            log_epoch(tracking, epoch_metrics)
    if tracking.step_offset > checkpoint_epoch:
        logger.warning(
            "MLflow run has steps up to %d but the checkpoint is at epoch %d; epochs %d..%d will be logged again",
            tracking.step_offset,
            checkpoint_epoch,
            checkpoint_epoch + 1,
            tracking.step_offset,
        )


def restart_run(tracking: Tracking) -> Tracking:
    """End the reopened run and start a new one of the same name: resume found the run but no
    checkpoint of it, so its steps cannot be continued."""
    import mlflow

    mlflow.end_run()
    return replace(tracking, run=start_run(tracking.base_name, tracking.hptuning_tag), step_offset=0)


def run_tag(tracking: Tracking, key: str) -> str | None:
    """The value of tag ``key`` of the tracked run, None when it has none (or tracking is off)."""
    if not tracking.tracked or tracking.run_id is None:
        return None
    import mlflow

    return mlflow.MlflowClient().get_run(tracking.run_id).data.tags.get(key)


def end_failed(tracking: Tracking, error: BaseException) -> None:
    """End the run FAILED (KILLED on Ctrl-C) with the error in its ``kiln.error`` tag."""
    if not tracking.tracked:
        return
    import mlflow

    tracking.log("set_tag", key="kiln.error", value=f"{type(error).__name__}: {error}"[:5000])
    mlflow.end_run(status="KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
