"""Where kiln's inference finds a trained model, and ``python -m kiln.models download``.

A model is named the ways the template's users name it:

- a kiln checkpoint file (``models/<run id>/checkpoint.pt``, what training writes to ``artifact_dir_path``);
- a folder holding one: a run's downloaded artifacts (``models/<run id>`` after ``python -m kiln.models
  download <run id> --dst models``) or a pyfunc model folder (``mlflow.pyfunc`` layout);
- a path inside a downloaded run, as the template's guide writes ``PRED_MODEL_PATH``
  (``models/<run id>/artifacts/model/data/model``): the run's checkpoint is found in the nearest
  folder above it that holds one, at most :data:`WALK_UP_LEVELS` folders up — the run's download
  (``models/<run id>/checkpoint/checkpoint.pt``), a copy of the run's artifact-store folder
  (``models/<run id>/artifacts/checkpoint/checkpoint.pt``, the guide's ``gsutil cp -r``) or a pyfunc
  model folder (``.../model/artifacts/checkpoint.pt``);
- an MLflow URI: ``runs:/<run id>/model`` (or ``runs:/<run id>``) and ``models:/<name>/<version>``.

Checkpoints are read by the C++ predictor, which never unpickles code; a ``model=python:...`` checkpoint
carries its model as a TorchScript archive, which the predictor runs (trusted sources only).

    python -m kiln.models download <run id> --dst models/ [--tracking-uri http://mlflow:5000]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
# Where a checkpoint sits inside the folders users point at, most specific first: a run's artifacts
# (training logs the checkpoint under "checkpoint/"), a pyfunc model's artifacts, a plain folder.
_CHECKPOINT_PLACES = (
    Path(CHECKPOINT_NAME),
    Path("checkpoint") / CHECKPOINT_NAME,
    Path("artifacts") / CHECKPOINT_NAME,
    Path("artifacts") / "checkpoint" / CHECKPOINT_NAME,
)


# How far above a path kiln looks for a run's checkpoint: the guide's artifacts/model/data/model is 4
# folders below the run's.
WALK_UP_LEVELS = 4


class ModelNotFoundError(FileNotFoundError):
    """The model path or URI does not lead to a kiln checkpoint."""


def _find_checkpoint_in(folder: Path) -> Path | None:
    for place in _CHECKPOINT_PLACES:
        if (folder / place).is_file():
            return folder / place
    return None


def _places() -> str:
    return ", ".join(str(place) for place in _CHECKPOINT_PLACES)


def _checkpoint_above(path: Path) -> Path:
    """The checkpoint of the run ``path`` lies in: in ``path`` (a folder) or the nearest of the
    :data:`WALK_UP_LEVELS` folders above it that holds one."""
    for folder in (path, *list(path.parents)[:WALK_UP_LEVELS]):
        found = _find_checkpoint_in(folder) if folder.is_dir() else None
        if found is not None:
            if folder != path:
                logger.info("Model path %s is inside a run's download; using its checkpoint %s", path, found)
            return found
    state = "is a folder with no kiln checkpoint" if path.is_dir() else "does not exist"
    raise ModelNotFoundError(
        f"model '{path}' {state}, and none of the {WALK_UP_LEVELS} folders above it holds one: looked for "
        + _places()
        + "; point at the checkpoint file, a run's downloaded artifacts (python -m kiln.models download "
        "<run id> --dst models, then models/<run id>) or an MLflow URI (runs:/<run id>/model)"
    )


def _checkpoint_in(folder: Path) -> Path:
    found = _find_checkpoint_in(folder)
    if found is not None:
        return found
    raise ModelNotFoundError(
        f"no kiln checkpoint in '{folder}': looked for "
        + _places()
        + "; point at the checkpoint file, a run's downloaded artifacts or an MLflow URI (runs:/<run id>/model)"
    )


def _run_id_of(uri: str) -> str:
    parts = [part for part in uri[len("runs:/") :].split("/") if part]
    if not parts:
        raise ModelNotFoundError(f"'{uri}' names no run; expected runs:/<run id>/model")
    return parts[0]


def resolve_checkpoint(model: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local kiln checkpoint file for ``model`` (a path or an MLflow URI; see the module doc). A
    path that is not a checkpoint file leads to the checkpoint in it or, for a path inside a
    downloaded run, in the nearest folder above it that holds one.

    MLflow URIs are downloaded from the tracking server (``MLFLOW_TRACKING_URI``) into ``cache_dir``
    (a fresh temp dir by default). Raises :class:`ModelNotFoundError` naming what was looked for.
    """
    text = os.fspath(model)
    if text.startswith("runs:/"):
        run_dir = download(_run_id_of(text), Path(cache_dir or tempfile.mkdtemp(prefix="kiln-model-")))
        return _checkpoint_in(run_dir)
    if text.startswith("models:/"):
        import mlflow

        target = Path(cache_dir or tempfile.mkdtemp(prefix="kiln-model-"))
        try:
            folder = mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(target))
        except Exception as error:  # MLflow raises its own exception types for unknown models
            raise ModelNotFoundError(f"cannot download '{text}' from MLflow: {error}") from error
        return _checkpoint_in(Path(folder))
    path = Path(text).expanduser()
    if path.is_file():
        return path
    return _checkpoint_above(path)


def download(run_id: str, dst: str | os.PathLike[str], tracking_uri: str | None = None) -> Path:
    """Download the artifacts of MLflow run ``run_id`` into ``<dst>/<run_id>`` and return that folder.

    As the template's ``PRED_MODEL_UUID`` flow: the folder holds the run's checkpoint
    (``checkpoint/checkpoint.pt``), config and plots. The copy appears complete or not at all; an
    existing copy is reused.
    """
    import mlflow

    from kiln.tracking import allow_local_file_store

    target = Path(dst) / run_id
    if target.is_dir():
        logger.info("Model of run %s already downloaded at %s", run_id, target)
        return target
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    allow_local_file_store(mlflow.get_tracking_uri())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{run_id}-", dir=target.parent))
    try:
        try:
            mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(staging))
        except Exception as error:  # MLflow raises its own exception types for unknown runs/servers
            raise ModelNotFoundError(
                f"cannot download the artifacts of run '{run_id}' from {mlflow.get_tracking_uri()}: {error}"
            ) from error
        _checkpoint_in(staging)  # refuse a run that has no kiln checkpoint
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Downloaded the artifacts of run %s to %s", run_id, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.models", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="download an MLflow run's model (checkpoint, config, plots)")
    get.add_argument("run_id", help="the MLflow run id (PRED_MODEL_UUID)")
    get.add_argument("--dst", default="models", help="folder to download into; the run lands in <dst>/<run id>")
    get.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        folder = download(args.run_id, args.dst, args.tracking_uri)
    except ModelNotFoundError as error:
        print(f"kiln.models: {error}", file=sys.stderr)
        return 1
    print(_checkpoint_in(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
