"""Which device and which precision kiln computes in: one rule for training, batch inference,
serving and the MLflow pyfunc model.

- Device: the GPU when CUDA is available and ``no_cuda`` is false, else the CPU.
- Training (``precision``: auto, fp32, bf16): ``auto`` is bf16 where it is faster, else fp32. On a
  GPU that is where CUDA computes bf16. On a CPU, native bf16 (AVX512_BF16) is not always
  faster: on one 2-core Xeon VM the plain PyTorch loop trained 1.7x faster in bf16, on another (no AMX)
  kiln's mnist_cnn trained 1.3-1.5x slower and the PyTorch loop 1.1-1.2x slower. So where the CPU
  has native bf16, kiln times a 3x3-convolution training step in both once per machine (about a
  second; cached in ``~/.cache/kiln/cpu-precision.json``, or under ``$XDG_CACHE_HOME``) and picks bf16
  only when it is at least 1.2x faster; the log says which and why.
- Inference (``inference.precision``, ``PRECISION``: auto, fp32, bf16, int8): ``auto`` on the CPU is
  int8 where it can run (a checkpoint carrying kiln's int8 calibration, an x86-64 CPU with AVX2), else what
  training's ``auto`` picks; on a GPU, training's ``auto``. An explicit ``int8`` where it cannot run
  is a ValueError naming what is missing.

The C++ core checks the names it is handed as well; this module is where Python checks them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln._core import Predictor

logger = logging.getLogger(__name__)

FLOAT_PRECISIONS = ("fp32", "bf16")
TRAINING_PRECISIONS = ("auto", *FLOAT_PRECISIONS)
INFERENCE_PRECISIONS = (*TRAINING_PRECISIONS, "int8")

# bf16 must beat fp32 by this much on a CPU for ``auto`` to pick it: near a tie fp32 wins, being exact.
BF16_MIN_SPEEDUP = 1.2


def _check(requested: str, allowed: tuple[str, ...]) -> None:
    if requested not in allowed:
        raise ValueError(f"precision must be one of {', '.join(allowed)}, got {requested!r}")


def resolve_device(no_cuda: bool) -> str:
    """``cuda`` when CUDA is available and ``no_cuda`` is false, else ``cpu``."""
    import torch

    return "cuda" if not no_cuda and torch.cuda.is_available() else "cpu"


def resolve_precision(requested: str, device: str) -> str:
    """Training's precision on ``device``: fp32 or bf16 as asked; ``auto`` is bf16 where it is faster
    (a GPU that computes bf16; a CPU with native bf16 where it measured at least 1.2x fp32's speed),
    else fp32."""
    import torch

    _check(requested, TRAINING_PRECISIONS)
    if requested in FLOAT_PRECISIONS:
        return requested
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return _cpu_auto()


@functools.cache
def _cpu_auto() -> str:
    """``auto`` on this CPU, with the reason logged once per process."""
    import torch

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        logger.info("precision=auto: fp32 (this CPU has no native bf16: AVX512_BF16 or AMX)")
        return "fp32"
    fp32_ms, bf16_ms = measure_cpu_bf16()
    speedup = fp32_ms / bf16_ms
    chosen = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    logger.info(
        "precision=auto: %s (a 3x3-convolution training step on this CPU took %.1f ms in bf16, %.1f ms in fp32: "
        "bf16 at %.2fx; kiln picks bf16 from %.1fx; measured once, cached in %s)",
        chosen,
        bf16_ms,
        fp32_ms,
        speedup,
        BF16_MIN_SPEEDUP,
        _cache_file(),
    )
    return chosen


def _cache_file() -> Path | None:
    """``$XDG_CACHE_HOME/kiln/cpu-precision.json`` (``~/.cache`` by default); None where there is no home
    (a container running as a user without a passwd entry): the answer then lasts for the process."""
    try:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:
        return None
    return root / "kiln" / "cpu-precision.json"


def _machine_key() -> str:
    """What the measurement depends on: the CPU, torch, the threads and the ISA limits in force."""
    import torch

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    limits = ",".join(f"{name}={os.environ.get(name, '')}" for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"))
    return f"{model}|{os.cpu_count()} cpus|torch {torch.__version__}|{torch.get_num_threads()} threads|{limits}"


@functools.cache
def measure_cpu_bf16() -> tuple[float, float]:
    """Milliseconds of one 3x3-convolution training step (forward and backward) on this CPU in fp32
    and under bf16 autocast, as ``(fp32_ms, bf16_ms)``: from the cache when this machine was measured
    before (same CPU, torch, threads and ISA limits), else measured now (about a second) and cached."""
    cache, key = _cache_file(), _machine_key()
    try:
        known = json.loads(cache.read_text()) if cache is not None else {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    if isinstance(entry, dict) and {"fp32_ms", "bf16_ms"} <= entry.keys():
        return float(entry["fp32_ms"]), float(entry["bf16_ms"])
    fp32_ms, bf16_ms = _time_conv_steps()
    known = known if isinstance(known, dict) else {}
    known[key] = {"fp32_ms": round(fp32_ms, 3), "bf16_ms": round(bf16_ms, 3)}
    if cache is None:
        return fp32_ms, bf16_ms
    try:  # a read-only home (a container) keeps the answer for this process only
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f"{cache.name}.{os.getpid()}")
        partial.write_text(json.dumps(known, indent=1))
        os.replace(partial, cache)
    except OSError as error:
        logger.debug("could not cache the precision measurement in %s: %s", cache, error)
    return fp32_ms, bf16_ms


def _time_conv_steps(rounds: int = 5) -> tuple[float, float]:
    """The fastest of ``rounds`` alternating fp32 and bf16-autocast training steps of a 3x3 convolution
    (32 -> 64 channels on 26x26, batch 32, channels-last: mnist_cnn's conv2, a ResNet middle layer's
    shape), in milliseconds. The fastest, not the mean: a descheduled thread only ever adds time."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # the weights' init leaves torch's global generator as it was
        conv = torch.nn.Conv2d(32, 64, 3).to(memory_format=torch.channels_last)
    images = torch.randn(32, 32, 26, 26, generator=generator).contiguous(memory_format=torch.channels_last)
    images.requires_grad_(True)

    def step(bf16: bool) -> float:
        images.grad = None
        conv.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = conv(images)
        out.float().sum().backward()
        return (time.perf_counter() - start) * 1e3

    best = {False: float("inf"), True: float("inf")}
    with torch.enable_grad():
        for bf16 in (False, True):  # warm-up: oneDNN builds its kernels on first use
            step(bf16)
        for _ in range(rounds):
            for bf16 in (False, True):
                best[bf16] = min(best[bf16], step(bf16))
    return best[False], best[True]


def load_predictor(checkpoint: str | os.PathLike[str], no_cuda: bool, precision: str = "auto") -> Predictor:
    """kiln.Predictor for ``checkpoint`` on the device ``no_cuda`` picks, in inference's ``precision``.

    ``auto`` on the CPU: int8 where it can run (a checkpoint with kiln's int8 calibration, a CPU with
    AVX2), else what training's ``auto`` picks (bf16 where it is faster, else fp32); on a GPU:
    training's ``auto``. ``int8`` without those raises ValueError naming what is missing.
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
