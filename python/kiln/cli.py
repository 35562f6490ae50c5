"""Helpers shared by the Hydra apps in ``src/``."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kiln import general_utils

if TYPE_CHECKING:
    from omegaconf import DictConfig

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
_KEY_OVERRIDE = re.compile(r"^(?P<op>\+\+|\+|~)?(?P<key>[A-Za-z_]\w*)(?P<tail>=.*)?$", re.DOTALL)

# The template's names for kiln's keys, per app: the guides' spelling is accepted on the command line and
# becomes kiln's key before Hydra sees it, so the composed (and logged) config holds kiln's key only.
KEY_ALIASES: dict[str, dict[str, str]] = {
    # The Run:ai guide's `train_model.model_checkpoint_dir_path=...`: where checkpoints go.
    "train_model": {"model_checkpoint_dir_path": "artifact_dir_path"},
}


def accept_app_prefixed_overrides(app_name: str, argv: list[str] | None = None) -> None:
    """Accept the template guides' spellings of overrides.

    - ``<app_name>.<key>=value`` as ``<key>=value``: the template's Run:ai and Polyaxon guides write
      ``process_data.raw_data_dir_path=…`` and ``train_model.epochs=3`` while the apps' YAML keys are
      top-level;
    - the template's key names in :data:`KEY_ALIASES` as kiln's (``model_checkpoint_dir_path=…`` is
      ``artifact_dir_path=…``), with or without the prefix. Given both, the later one on the command
      line wins, as with any key Hydra is given twice.

    Both spellings work in kiln. Rewrites ``sys.argv`` (or ``argv``) in place before Hydra parses it.
    """
    args = sys.argv if argv is None else argv
    aliases = KEY_ALIASES.get(app_name, {})
    for index, arg in enumerate(args[1:], start=1):
        if arg.startswith("-"):
            continue
        match = _PREFIXED_OVERRIDE.match(arg)
        if match and match["app"] == app_name:
            arg = args[index] = (match["op"] or "") + match["rest"]
        match = _KEY_OVERRIDE.match(arg)
        if match and match["key"] in aliases:
            # "+alias=..." sets the key kiln already has: without the "+", which Hydra would refuse.
            op = "" if match["op"] == "+" else (match["op"] or "")
            args[index] = op + aliases[match["key"]] + (match["tail"] or "")


def compose_config(config_name: str, overrides: Sequence[str] = (), conf_dir: Path | None = None) -> DictConfig:
    """``conf/<config_name>.yaml`` with Hydra ``overrides`` applied: the config an app's ``main``
    receives (without Hydra's own ``hydra:`` section), for calling ``kiln.training.train(cfg)``,
    ``kiln.inference.batch_infer(cfg, out)`` or ``kiln.processing.process_data(cfg)`` from Python.

    ``conf_dir`` defaults to the folder of :func:`logging_config_path` (./conf, else the checkout's).
    """
    from hydra import compose, initialize_config_dir

    directory = (conf_dir or logging_config_path().parent).resolve()
    with initialize_config_dir(config_dir=str(directory)):
        return compose(config_name=config_name, overrides=list(overrides))


def setup_app_logging(log_dir: str | None) -> None:
    """Configure logging from the repo's conf/logging.yaml, with files in ``log_dir``."""
    general_utils.setup_logging(logging_config_path=str(logging_config_path()), log_dir=log_dir)


def _is_expected(error: Exception) -> bool:
    from kiln.tracking import TrackingError

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
