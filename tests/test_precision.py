"""kiln.precision: the one device and precision rule of training, batch inference, serving and the
MLflow pyfunc model (tests/test_train_model.py checks that the pyfunc model answers as serving)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln import precision
from kiln.precision import load_predictor


def test_no_cuda_means_the_cpu() -> None:
    assert precision.resolve_device(True) == "cpu"
    assert precision.resolve_device(False) == ("cuda" if torch.cuda.is_available() else "cpu")


def test_training_precision_is_as_asked_or_bf16_where_native() -> None:
    assert precision.resolve_precision("fp32", "cpu") == "fp32"
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert precision.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")


@pytest.mark.parametrize("name", ["int8", "fp16", "AUTO", ""])
def test_training_refuses_other_precisions_naming_the_choices(name: str) -> None:
    with pytest.raises(ValueError, match=f"precision must be one of auto, fp32, bf16, got '{name}'"):
        precision.resolve_precision(name, "cpu")


def test_inference_refuses_other_precisions_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, int8, got 'fp16'"):
        load_predictor(Path("never-read.pt"), no_cuda=True, precision="fp16")
