"""Train the image classifier: ``python src/train_model.py`` (``--multirun`` for the Optuna sweep).

Reads conf/train_model.yaml; every epoch runs in kiln's C++ trainer. Returns the last epoch's
(test_loss, test_accuracy), the sweep's two objectives.
"""

import logging

import hydra
from omegaconf import DictConfig

from kiln import cli
from kiln.training import train

logger = logging.getLogger(__name__)


@hydra.main(version_base=None, config_path="../conf", config_name="train_model.yaml")
def main(args: DictConfig) -> tuple[float, float]:
    cli.setup_app_logging(args.get("log_dir"))
    with cli.exit_on_user_error(logger):
        result = train(args)
    return result["test_loss"], result["test_accuracy"]


if __name__ == "__main__":
    cli.accept_app_prefixed_overrides("train_model")
    main()
