"""General utilities of the kiln template.

This module holds the general-purpose helpers that the AI Singapore MLOps
template keeps in ``general_utils``: :func:`setup_logging`, which configures
:mod:`logging` from ``conf/logging.yaml``, and the MLflow helpers
:func:`mlflow_init` and :func:`mlflow_log`.
"""

import contextlib
import importlib.util
import logging
import logging.config
import os
import re
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

import yaml

logger = logging.getLogger(__name__)

BASIC_LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


def setup_logging(
    logging_config_path="./conf/logging.yaml",
    default_level=logging.INFO,
    log_dir=None,
):
    """Configure logging from a YAML ``dictConfig`` file.

    The YAML file at ``logging_config_path`` is read and passed to
    :func:`logging.config.dictConfig`. The file itself is only read, never
    modified.

    With ``log_dir``, every handler that has a ``filename`` writes into
    ``log_dir`` instead, keeping the file's base name (``./logs/info.log``
    becomes ``<log_dir>/info.log``); ``log_dir`` is created if needed and the
    directories named in the YAML are not. Without ``log_dir``, the file
    names are used as given and their parent directories are created, so a
    missing ``./logs`` never makes the configuration fail.

    If the file is missing or cannot be read, is not valid YAML, does not hold
    a mapping, or ``dictConfig`` rejects it, logging falls back to
    :func:`logging.basicConfig` at ``default_level`` and a warning naming the
    path and the error is logged.

    Args:
        logging_config_path: Path of the YAML logging configuration.
        default_level: Root level used by the ``basicConfig`` fallback.
        log_dir: Directory that receives every file handler's file, or
            ``None`` to keep the file names from the YAML.
    """
    try:
        with open(logging_config_path, encoding="utf-8") as file:
            log_config = yaml.safe_load(file)
        if not isinstance(log_config, dict):
            raise ValueError(f"expected a mapping for logging.config.dictConfig, got {type(log_config).__name__}")

        handlers = log_config.get("handlers") or {}
        if not isinstance(handlers, dict):
            raise ValueError(f"expected 'handlers' to be a mapping, got {type(handlers).__name__}")
        if log_dir:
            log_dir = os.fspath(log_dir)
            os.makedirs(log_dir, exist_ok=True)
        for handler in handlers.values():
            if not isinstance(handler, dict) or "filename" not in handler:
                continue
            filename = os.fspath(handler["filename"])
            if log_dir:
                filename = os.path.join(log_dir, os.path.basename(filename))
            handler["filename"] = filename
            parent = os.path.dirname(filename)
            if parent:
                os.makedirs(parent, exist_ok=True)

        logging.config.dictConfig(log_config)
    except Exception as error:  # any failure means: fall back to basicConfig
        logging.basicConfig(format=BASIC_LOG_FORMAT, level=default_level)
        logger.warning(
            "Could not configure logging from %r (%s: %s); using basicConfig at level %s instead.",
            str(logging_config_path),
            type(error).__name__,
            error,
            logging.getLevelName(default_level),
        )


# kiln's own per-epoch metrics; resume offsets steps by these only (system/* metrics count on their own).
TRAINING_METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


class TrackingError(RuntimeError):
    """MLflow tracking was asked for but cannot be used (unreachable server, bad URI, ...)."""


def _is_local_store(tracking_uri):
    return urlparse(str(tracking_uri)).scheme in ("", "file")


def allow_local_file_store(tracking_uri):
    """Let MLflow 3 use a local file store (kiln's ``./mlruns`` default), which it refuses unless
    ``MLFLOW_ALLOW_FILE_STORE=true``; other URIs are left alone. Returns whether the URI is local."""
    local = _is_local_store(tracking_uri)
    if local:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return local


def _check_tracking_server(tracking_uri, timeout=10.0):
    """Fail fast, naming the URI, instead of MLflow's minutes of retries against a dead server."""
    url = str(tracking_uri).rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status != 200:
                raise TrackingError(f"MLflow tracking server {tracking_uri} answered {response.status} on /health")
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingError(f"MLflow tracking server {tracking_uri} is unreachable: {reason}") from error


def run_base_name(run_name):
    """The template's naming: ``-hp`` is appended for hyperparameter-tuning jobs."""
    return f"{run_name}-hp" if "MLFLOW_HPTUNING_TAG" in os.environ else run_name


def start_mlflow_run(run_name):
    """Start a run named ``{run_name}-{unix time}``, tagged from the environment as the template does."""
    import mlflow

    run = mlflow.start_run(run_name=f"{run_name}-{int(time.time())}")
    _set_job_tags()
    return run


def _set_job_tags():
    import mlflow

    tags = {
        "hptuning_tag": os.environ.get("MLFLOW_HPTUNING_TAG"),
        "job_uuid": os.environ.get("JOB_UUID"),
        "job_name": os.environ.get("JOB_NAME"),
    }
    mlflow.set_tags({key: value for key, value in tags.items() if value})


def _set_experiment(name):
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


def _latest_run_named(client, experiment_id, base_run_name):
    """The newest run called ``{base_run_name}-{unix time}`` (not ``{base_run_name}-hp-...``)."""
    pattern = re.compile(re.escape(base_run_name) + r"-\d+$")
    runs = client.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.mlflow.runName LIKE '{base_run_name}-%'",
        order_by=["attributes.start_time DESC"],
        max_results=200,
    )
    return next((run for run in runs if pattern.match(run.data.tags.get("mlflow.runName", ""))), None)


def last_logged_step(client, run_id):
    """The largest step of kiln's training metrics in a run (0 if none)."""
    steps = [m.step for key in TRAINING_METRICS for m in client.get_metric_history(run_id, key)]
    return max(steps, default=0)


def mlflow_init(tracking_uri, exp_name, run_name, setup_mlflow=False, autolog=False, resume=False):
    """Initialise MLflow tracking for a training job, as the template's ``mlflow_init`` does.

    Sets the tracking URI and experiment, optionally ``mlflow.autolog()``, and starts a run named
    ``"{run_name}-{unix time}"`` (``"{run_name}-hp-{unix time}"`` when ``MLFLOW_HPTUNING_TAG`` is
    set) with the tags ``hptuning_tag``, ``job_uuid`` and ``job_name`` from the environment. Under
    ``mlflow run`` (``MLFLOW_RUN_ID`` set) it logs into that run and its experiment instead. With
    ``resume``, the newest run of that base name is reopened instead and ``step_offset`` is the
    largest step of its training metrics.

    A local tracking URI (``./mlruns``) is MLflow's file store, which MLflow 3 refuses unless
    ``MLFLOW_ALLOW_FILE_STORE=true``; kiln sets that for it. An ``http(s)`` server is checked
    first, so an unreachable one fails at once with its URI in the message.

    Returns ``(init_success, mlflow_run, step_offset)``. ``init_success`` is False when
    ``setup_mlflow`` is off, and also when setting up failed: that failure is logged as an error
    (never silently turned into untracked training), and the caller decides whether to stop.
    """
    init_success, mlflow_run, step_offset = False, None, 0
    if not setup_mlflow:
        return init_success, mlflow_run, step_offset
    try:
        import mlflow

        allow_local_file_store(tracking_uri)
        if urlparse(str(tracking_uri)).scheme in ("http", "https"):
            _check_tracking_server(tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        # Under `mlflow run` (MLflow Projects, locally or on Kubernetes) the job logs into the run MLflow
        # started for it, in that run's experiment, instead of a new one.
        project_run_id = None if resume else os.environ.get("MLFLOW_RUN_ID")
        if project_run_id:
            client = mlflow.MlflowClient()
            experiment = client.get_experiment(client.get_run(project_run_id).info.experiment_id)
        else:
            experiment = _set_experiment(exp_name)
        if importlib.util.find_spec("psutil") is not None:
            mlflow.enable_system_metrics_logging()  # system/* metrics, as the template logs
        if autolog:
            mlflow.autolog()
        run_name = run_base_name(run_name)
        if resume:
            client = mlflow.MlflowClient()
            previous = _latest_run_named(client, experiment.experiment_id, run_name)
            if previous is None:
                logger.warning(
                    "resume=true but experiment %r has no run named %s-<time>; starting a new run",
                    exp_name,
                    run_name,
                )
            else:
                mlflow_run = mlflow.start_run(run_id=previous.info.run_id)
                step_offset = last_logged_step(client, previous.info.run_id)
                logger.info(
                    "Resuming MLflow run %s (%s) after step %d",
                    previous.data.tags.get("mlflow.runName"),
                    previous.info.run_id,
                    step_offset,
                )
        if mlflow_run is None and project_run_id:
            # Named as kiln names its runs, so a later resume=true finds it.
            mlflow_run = mlflow.start_run(run_id=project_run_id, run_name=f"{run_name}-{int(time.time())}")
            _set_job_tags()
            logger.info("Logging into the MLflow Projects run %s (MLFLOW_RUN_ID)", project_run_id)
        if mlflow_run is None:
            mlflow_run = start_mlflow_run(run_name)
        init_success = True
    except Exception as error:  # reported loudly; the caller stops when tracking was required
        logger.error("MLflow could not be set up with tracking URI %s: %s", tracking_uri, error)
    return init_success, mlflow_run, step_offset


def mlflow_log(mlflow_init_status, log_function, **kwargs):
    """Call ``mlflow.<log_function>(**kwargs)`` when tracking is on.

    A tracking error is logged and never stops training, as in the template.
    """
    if not mlflow_init_status:
        return
    try:
        import mlflow

        getattr(mlflow, log_function)(**kwargs)
    except Exception as error:
        logger.error("mlflow.%s failed: %s", log_function, error)
