"""The CPU class a benchmark runs on, and `--isa avx2`: the AVX2-only class emulated on a larger CPU.

kiln's figures differ by CPU class (AVX-512 with bf16/VNNI vs AVX2 alone, the class of most laptops and
many cloud VMs). `--isa avx2` sets ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2 for every process
the benchmark starts (kiln's own precision and int8 checks honour them, as oneDNN and ATen do), and
MKL_ENABLE_INSTRUCTIONS=AVX2 so MKL's matrix products (fully connected layers, kiln's Winograd products)
leave AVX-512 too; both classes can be measured on one machine; every benchmark prints the class it ran on.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

LIMITS = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def add_isa_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--isa",
        choices=sorted(LIMITS),
        help="emulate this CPU class (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY for every process); default: own",
    )


def apply_isa(isa: str | None) -> None:
    """Sets the limits of `isa` in this process's environment, which the processes it starts inherit.
    Call before torch is imported here."""
    if isa:
        os.environ.update(LIMITS[isa])


def cpu_isa() -> str:
    """e.g. 'AVX2 (avx2, avx512f, avx512_bf16; limited by ONEDNN_MAX_CPU_ISA=AVX2), 2 threads'."""
    import torch

    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    extensions = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f" {f}" in flags]
    listed = ", ".join(extensions) or "no AVX2"
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    limited = f"; limited by ONEDNN_MAX_CPU_ISA={limit}" if limit else ""
    return f"{torch.backends.cpu.get_cpu_capability()} ({listed}{limited}), {torch.get_num_threads()} threads"
