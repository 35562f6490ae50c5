"""Which device and which precision kiln computes in: one rule for training, batch inference,
serving and the MLflow pyfunc model.

- Device: the GPU when CUDA is available and ``no_cuda`` is false, else the CPU.
- Training (``precision``: auto, fp32, bf16): ``auto`` is bf16 where the hardware computes it
  natively (same accuracy, faster), else fp32.
- Inference (``inference.precision``, ``PRECISION``: auto, fp32, bf16, int8): ``auto`` on the CPU is
  int8 where it can run (a checkpoint carrying kiln's int8 calibration, an x86-64 CPU with AVX2), else what
  training's ``auto`` picks; on a GPU, training's ``auto``. An explicit ``int8`` where it cannot run
  is a ValueError naming what is missing.

The C++ core checks the names it is handed as well; this module is where Python checks them.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln._core import Predictor

logger = logging.getLogger(__name__)

FLOAT_PRECISIONS = ("fp32", "bf16")
TRAINING_PRECISIONS = ("auto", *FLOAT_PRECISIONS)
INFERENCE_PRECISIONS = (*TRAINING_PRECISIONS, "int8")


def _check(requested: str, allowed: tuple[str, ...]) -> None:
    if requested not in allowed:
        raise ValueError(f"precision must be one of {', '.join(allowed)}, got {requested!r}")


def resolve_device(no_cuda: bool) -> str:
    """``cuda`` when CUDA is available and ``no_cuda`` is false, else ``cpu``."""
    import torch

    return "cuda" if not no_cuda and torch.cuda.is_available() else "cpu"


def resolve_precision(requested: str, device: str) -> str:
    """Training's precision on ``device``: fp32 or bf16 as asked; ``auto`` is bf16 where the hardware
    computes it natively (same accuracy, faster), else fp32."""
    import torch

    _check(requested, TRAINING_PRECISIONS)
    if requested in FLOAT_PRECISIONS:
        return requested
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def load_predictor(checkpoint: str | os.PathLike[str], no_cuda: bool, precision: str = "auto") -> Predictor:
    """kiln.Predictor for ``checkpoint`` on the device ``no_cuda`` picks, in inference's ``precision``.

    ``auto`` on the CPU: int8 where it can run (a checkpoint with kiln's int8 calibration, a CPU with
    AVX2), else what training's ``auto`` picks (bf16 where the hardware computes it natively, else
    fp32); on a GPU: training's ``auto``. ``int8`` without those raises ValueError naming what is missing.
    """
    import kiln

    _check(precision, INFERENCE_PRECISIONS)
    device = resolve_device(no_cuda)
    if precision == "int8":
        return kiln.Predictor(checkpoint, device=device, precision="int8")
    floating = resolve_precision(precision, device)
    if precision != "auto" or device != "cpu":
        return kiln.Predictor(checkpoint, device=device, precision=floating)
    predictor = kiln.Predictor(checkpoint, device=device, precision="int8", fallback=floating)
    if predictor.int8_unavailable:
        logger.info("Predicting in %s: no int8 here, %s", predictor.precision, predictor.int8_unavailable)
    return predictor
