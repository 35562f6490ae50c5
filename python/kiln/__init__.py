"""kiln: the AI Singapore MLOps template for image classification, with a C++ core.

The compiled core (``kiln._core``, LibTorch + OpenCV) is loaded on first use, so the light parts of
the package (``kiln.general_utils``, ``kiln.data``) import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "DataError",
    "FileNote",
    "ImageSpec",
    "Manifest",
    "Model",
    "Predictor",
    "ShardInfo",
    "SplitInfo",
    "Trainer",
    "TrainingError",
    "__version__",
    "classify_directory",
    "find_matching_files",
    "load_split",
    "model_names",
    "prepare_dataset",
    "read_manifest",
]

if TYPE_CHECKING:
    from kiln._core import (
        DataError,
        FileNote,
        ImageSpec,
        Manifest,
        Model,
        Predictor,
        ShardInfo,
        SplitInfo,
        Trainer,
        TrainingError,
        classify_directory,
        find_matching_files,
        load_split,
        model_names,
        prepare_dataset,
        read_manifest,
    )

_BUILD_HINT = (
    "kiln's C++ extension (kiln._core) could not be loaded: {error}. Build it from the repo root "
    "with torch installed: `pip install torch==2.13.0 scikit-build-core pybind11 && "
    "pip install --no-build-isolation -e .` (needs cmake, g++, libopencv-dev; see README.md)."
)


def _load_core() -> Any:
    # torch must be imported first: it loads libtorch and registers the tensor types _core uses.
    import torch  # noqa: F401

    try:
        return importlib.import_module("kiln._core")
    except ImportError as error:
        raise ImportError(_BUILD_HINT.format(error=error)) from error


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(_load_core(), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
