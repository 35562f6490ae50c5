"""General utilities of the kiln template.

This module holds the general-purpose helpers that the AI Singapore MLOps
template keeps in ``general_utils``: :func:`setup_logging`, which configures
:mod:`logging` from ``conf/logging.yaml``, and the MLflow helpers
:func:`mlflow_init` and :func:`mlflow_log`, the template's names for what
:mod:`kiln.tracking` does.
"""

from __future__ import annotations

import logging
import logging.config
import os
from typing import TYPE_CHECKING, Any

import yaml

from kiln import tracking as _tracking

if TYPE_CHECKING:
    import mlflow

logger = logging.getLogger(__name__)

BASIC_LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


def setup_logging(
    logging_config_path: str | os.PathLike[str] = "./conf/logging.yaml",
    default_level: int = logging.INFO,
    log_dir: str | os.PathLike[str] | None = None,
) -> None:
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


def mlflow_init(
    tracking_uri: str,
    exp_name: str,
    run_name: str,
    setup_mlflow: bool = False,
    autolog: bool = False,
    resume: bool = False,
    *,
    hptuning_tag: str | None = None,
) -> tuple[bool, mlflow.ActiveRun | None, int]:
    """Initialise MLflow tracking for a training job, as the template's ``mlflow_init`` does.

    Sets the tracking URI and experiment, optionally ``mlflow.autolog()``, and starts a run named
    ``"{run_name}-{unix time}"`` (``"{run_name}-hp-{unix time}"`` when ``MLFLOW_HPTUNING_TAG`` is
    set, or ``hptuning_tag`` given) with the tags ``hptuning_tag``, ``job_uuid`` and ``job_name``
    from the environment (``hptuning_tag``, when given, is the tag instead of
    ``$MLFLOW_HPTUNING_TAG``). Under ``mlflow run`` (``MLFLOW_RUN_ID`` set) it logs into that run
    and its experiment instead. With ``resume``, the newest run of that base name is reopened
    instead and ``step_offset`` is the largest step of its training metrics.

    A local tracking URI (``./mlruns``) is MLflow's file store, which MLflow 3 refuses unless
    ``MLFLOW_ALLOW_FILE_STORE=true``; kiln sets that for it. An ``http(s)`` server is checked
    first, so an unreachable one fails at once with its URI in the message.

    Returns ``(init_success, mlflow_run, step_offset)``. ``init_success`` is False when
    ``setup_mlflow`` is off, and also when setting up failed: that failure is logged as an error
    (never silently turned into untracked training), and the caller decides whether to stop.
    The work is done by :func:`kiln.tracking.open_run`.
    """
    if not setup_mlflow:
        return False, None, 0
    tracking = _tracking.open_run(
        tracking_uri, exp_name, run_name, autolog=autolog, resume=resume, hptuning_tag=hptuning_tag
    )
    return tracking.tracked, tracking.run, tracking.step_offset


def mlflow_log(mlflow_init_status: bool, log_function: str, **kwargs: Any) -> None:
    """Call ``mlflow.<log_function>(**kwargs)`` when tracking is on.

    A tracking error is logged and never stops training, as in the template.
    """
    _tracking.log(bool(mlflow_init_status), log_function, **kwargs)
