"""Prepare the raw image tree for training: ``python src/process_data.py``.

Reads conf/process_data.yaml; decoding runs in kiln's C++ core on all cores.
"""

import logging

import hydra
from omegaconf import DictConfig

from kiln import cli
from kiln.processing import process_data

logger = logging.getLogger(__name__)


@hydra.main(version_base=None, config_path="../conf", config_name="process_data.yaml")
def main(args: DictConfig) -> None:
    cli.setup_app_logging(args["log_dir"])
    with cli.exit_on_user_error(logger):
        process_data(args)


if __name__ == "__main__":
    cli.accept_app_prefixed_overrides("process_data")
    main()
