"""Train the image classifier: ``python src/train_model.py`` (``--multirun`` for the Optuna sweep).

Reads conf/train_model.yaml; every epoch runs in kiln's C++ trainer. Returns the last epoch's
(test_loss, test_accuracy), the sweep's two objectives.
"""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kiln import cli
from kiln.tracking import SweepTrial
from kiln.training import train

logger = logging.getLogger(__name__)


# kiln.tracking.RecordSweepStart is the one target conf/train_model.yaml instantiates (hydra.callbacks).
@hydra.main(
    version_base=None,
    config_path="../conf",
    config_name="train_model.yaml",
    execution_whitelist=["kiln.tracking.RecordSweepStart"],
)
def main(args: DictConfig) -> tuple[float, float]:
    cli.setup_app_logging(args["log_dir"])
    if cli.in_multirun():
        cli.share_cores_between_parallel_trials()
        trial = SweepTrial.from_hydra(HydraConfig.get())
        try:
            result = train(args, trial=trial)
        except Exception:
            # NaN objectives make Optuna record the trial as FAIL, and the sweep goes on (the
            # sweeper's default max_failure_rate of 0 would end it at the first exception).
            logger.exception("Trial %s failed; the sweep goes on", trial.number)
            return float("nan"), float("nan")
    else:
        with cli.exit_on_user_error(logger):
            result = train(args)
    return result["test_loss"], result["test_accuracy"]


if __name__ == "__main__":
    cli.accept_app_prefixed_overrides("train_model")
    main()
