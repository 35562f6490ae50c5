"""Makes PyPI's torchvision 0.28.0 importable beside the CPU build of torch 2.13.0, for tests only.

torchvision's wheel carries C++ ops (nms, roi_align, ...) compiled for the CUDA build of torch; beside
the CPU build its library does not load, and ``import torchvision`` then fails in
``torchvision/_meta_registrations.py`` with ``RuntimeError: operator torchvision::nms does not exist``
when it registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``. Declaring those two
schemas first (their real signatures, csrc/ops/nms.cpp and the quantized qnms) lets the import finish.
The ops themselves stay unimplemented; the classification models and ``transforms.v2`` that kiln's
tests use are pure Python. kiln itself never imports torchvision at run time.
"""

from __future__ import annotations

import importlib.util
import types

import torch

_library: torch.library.Library | None = None


def import_torchvision() -> types.ModuleType | None:
    """torchvision, importable; None when it is not installed."""
    global _library
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision

        return torchvision
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    if _library is None:
        _library = torch.library.Library("torchvision", "DEF")
        _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import sys

    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        del sys.modules[name]
    import torchvision

    return torchvision
