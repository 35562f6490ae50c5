"""Helpers shared by the Hydra apps in ``src/``."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from kiln import general_utils

# The apps keep the template's `@hydra.main(version_base=None, ...)`, which Hydra 1.4 (the line
# whose Optuna sweeper works with current Optuna) reports as deprecated on every run.
warnings.filterwarnings("ignore", message="The version_base parameter is deprecated")

# The repo's conf/ in a source checkout; an installed kiln (a wheel, as in the images) uses ./conf.
_SOURCE_CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def logging_config_path() -> Path:
    """conf/logging.yaml of the working dir (the template's default), else of the source checkout."""
    for candidate in (Path("conf") / "logging.yaml", Path("..") / "conf" / "logging.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    return _SOURCE_CONF_DIR / "logging.yaml"


_PREFIXED_OVERRIDE = re.compile(r"^(?P<op>\+\+|\+|~)?(?P<app>[A-Za-z_]\w*)\.(?P<rest>.+)$")


def accept_app_prefixed_overrides(app_name: str, argv: list[str] | None = None) -> None:
    """Accept ``<app_name>.<key>=value`` overrides as ``<key>=value``.

    The template's Run:ai and Polyaxon guides write overrides such as
    ``process_data.raw_data_dir_path=…`` and ``train_model.epochs=3`` while the apps' YAML keys are
    top-level; both spellings work in kiln. Rewrites ``sys.argv`` (or ``argv``) in place before
    Hydra parses it.
    """
    args = sys.argv if argv is None else argv
    for index, arg in enumerate(args[1:], start=1):
        if arg.startswith("-"):
            continue
        match = _PREFIXED_OVERRIDE.match(arg)
        if match and match["app"] == app_name:
            args[index] = (match["op"] or "") + match["rest"]


def setup_app_logging(log_dir: str | None) -> None:
    """Configure logging from the repo's conf/logging.yaml, with files in ``log_dir``."""
    general_utils.setup_logging(logging_config_path=str(logging_config_path()), log_dir=log_dir)


def _is_expected(error: Exception) -> bool:
    from kiln.general_utils import TrackingError

    expected: tuple[type[Exception], ...] = (FileNotFoundError, ValueError, TrackingError)
    core = sys.modules.get("kiln._core")  # loaded by then if the error came from the C++ core
    if core is not None:
        expected += (core.TrainingError,)
    return isinstance(error, expected)


def in_multirun() -> bool:
    """Whether this Hydra job is one trial of a --multirun sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def share_cores_between_parallel_trials() -> None:
    """With a process launcher running n_jobs trials at once (hydra/launcher=joblib), give each
    trial's torch its share of the cores instead of letting every process take all of them."""
    import torch
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    config = HydraConfig.get()
    n_jobs = int(OmegaConf.select(config, "sweeper.n_jobs", default=1) or 1)
    launcher = str(OmegaConf.select(config, "launcher._target_", default=""))
    if n_jobs > 1 and "BasicLauncher" not in launcher:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_jobs))


def sweep_trial_tags() -> dict[str, str]:
    """Group a sweep's trials in MLflow: MLFLOW_HPTUNING_TAG, when the user did not set it, becomes
    the sweep's output dir (named after the sweep's start time, the same for every trial, also in
    parallel worker processes); returns the trial's own tags (trial number, study name)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    config = HydraConfig.get()
    os.environ.setdefault("MLFLOW_HPTUNING_TAG", str(config.sweep.dir))
    tags = {"trial_number": str(config.job.num)}
    study_name = OmegaConf.select(config, "sweeper.study_name")
    if study_name:
        tags["study_name"] = str(study_name)
    return tags


@contextlib.contextmanager
def exit_on_user_error(logger: logging.Logger) -> Iterator[None]:
    """Turn expected failures into one clear log line and exit code 1, not a traceback.

    Missing paths (FileNotFoundError), unusable data or options (ValueError, which kiln's
    DataError is), an unusable MLflow (TrackingError) and a diverging loss (kiln.TrainingError) are
    the user's to fix; anything else is a bug and keeps its traceback.
    """
    try:
        yield
    except Exception as error:
        if not _is_expected(error):
            raise
        logger.error("%s", error)
        raise SystemExit(1) from error
