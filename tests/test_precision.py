"""kiln.precision: the one device and precision rule of training, batch inference, serving and the
MLflow pyfunc model (tests/test_train_model.py checks that the pyfunc model answers as serving)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln import precision
from kiln.precision import load_predictor


def test_no_cuda_means_the_cpu() -> None:
    assert precision.resolve_device(True) == "cpu"
    assert precision.resolve_device(False) == ("cuda" if torch.cuda.is_available() else "cpu")


NATIVE_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_training_precision_is_as_asked_or_bf16_where_it_measures_faster() -> None:
    assert precision.resolve_precision("fp32", "cpu") == "fp32"
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    if not NATIVE_BF16:
        assert precision.resolve_precision("auto", "cpu") == "fp32"
        return
    fp32_ms, bf16_ms = precision.measure_cpu_bf16()
    assert fp32_ms > 0 and bf16_ms > 0
    faster = fp32_ms / bf16_ms >= precision.BF16_MIN_SPEEDUP
    assert precision.resolve_precision("auto", "cpu") == ("bf16" if faster else "fp32")


def _auto_in_subprocess(cache_home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``resolve_precision("auto", "cpu")`` in a fresh interpreter whose cache lives in ``cache_home``."""
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "from kiln.precision import resolve_precision\n"
        "print(resolve_precision('auto', 'cpu'))"
    )
    environment = {**os.environ, "XDG_CACHE_HOME": str(cache_home), **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120, check=True
    )


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16: auto is fp32 without measuring")
def test_auto_on_the_cpu_measures_once_per_machine_and_says_why(tmp_path: Path) -> None:
    first = _auto_in_subprocess(tmp_path)
    cache = tmp_path / "kiln" / "cpu-precision.json"
    (key, measured), *others = json.loads(cache.read_text()).items()
    assert not others
    assert measured["fp32_ms"] > 0 and measured["bf16_ms"] > 0
    assert "torch " + torch.__version__ in key
    chosen = first.stdout.strip()
    assert chosen == ("bf16" if measured["fp32_ms"] / measured["bf16_ms"] >= precision.BF16_MIN_SPEEDUP else "fp32")
    assert f"precision=auto: {chosen} (a 3x3-convolution training step on this CPU took" in first.stderr

    # The next process takes the machine's measurement from the cache instead of timing again.
    for fp32_ms, bf16_ms, expected in ((10.0, 5.0, "bf16"), (10.0, 9.0, "fp32"), (10.0, 20.0, "fp32")):
        cache.write_text(json.dumps({key: {"fp32_ms": fp32_ms, "bf16_ms": bf16_ms}}))
        again = _auto_in_subprocess(tmp_path)
        assert again.stdout.strip() == expected
        assert f"took {bf16_ms:.1f} ms in bf16, {fp32_ms:.1f} ms in fp32" in again.stderr


def test_auto_is_fp32_without_measuring_where_the_isa_limit_leaves_no_bf16(tmp_path: Path) -> None:
    limited = _auto_in_subprocess(tmp_path, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    assert limited.stdout.strip() == "fp32"
    assert "this CPU has no native bf16" in limited.stderr
    assert not (tmp_path / "kiln" / "cpu-precision.json").exists()


@pytest.mark.parametrize("name", ["int8", "fp16", "AUTO", ""])
def test_training_refuses_other_precisions_naming_the_choices(name: str) -> None:
    with pytest.raises(ValueError, match=f"precision must be one of auto, fp32, bf16, got '{name}'"):
        precision.resolve_precision(name, "cpu")


def test_inference_refuses_other_precisions_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, int8, got 'fp16'"):
        load_predictor(Path("never-read.pt"), no_cuda=True, precision="fp16")
