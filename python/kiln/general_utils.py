"""General utilities of the kiln template.

This module holds the general-purpose helpers that the AI Singapore MLOps
template keeps in ``general_utils``. For now that is :func:`setup_logging`,
which configures :mod:`logging` from ``conf/logging.yaml``; the MLflow helpers
(``mlflow_init`` and ``mlflow_log``) are added here by a separate change.
"""

import logging
import logging.config
import os

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
            raise ValueError(
                f"expected a mapping for logging.config.dictConfig, got {type(log_config).__name__}"
            )

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
