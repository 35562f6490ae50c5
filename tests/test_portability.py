"""kiln's C++ compiles for aarch64 (issue 17: an arm64 VM or an Apple-silicon conda env must build it):
scripts/check-aarch64.sh cross-compiles every translation unit of the core and the bindings on this machine."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import REPO

CROSS_CXX = "aarch64-linux-gnu-g++"


@pytest.mark.skipif(
    shutil.which(CROSS_CXX) is None,
    reason=f"no aarch64 cross compiler ({CROSS_CXX}): apt-get install g++-aarch64-linux-gnu (scripts/setup.sh does)",
)
def test_every_core_and_binding_source_compiles_for_aarch64():
    # Cold, the 39 units take minutes on two cores; ccache makes a rerun with unchanged sources take seconds.
    result = subprocess.run(
        ["bash", "scripts/check-aarch64.sh"], cwd=REPO, capture_output=True, text=True, timeout=1800
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    checked = set(re.findall(r"^ok +(\S+\.cpp) ", result.stdout, flags=re.MULTILINE))
    sources = {p.relative_to(REPO).as_posix() for d in ("cpp/src", "cpp/bindings") for p in (REPO / d).rglob("*.cpp")}
    assert sources - checked == set(), report
    assert f"all {len(checked)} translation units compile for aarch64" in result.stdout
