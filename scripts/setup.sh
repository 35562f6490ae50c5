#!/usr/bin/env bash
# Installs what kiln needs on a fresh Debian/Ubuntu machine (system packages, then Python packages
# into the active Python: a venv, a conda env or the system one) and builds kiln's C++ extension.
# Safe to run again: installed packages are skipped and the build is incremental.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(cmake ninja-build g++ ccache pkg-config libopencv-dev libgtest-dev nlohmann-json3-dev libdeflate-dev curl
  postgresql  # PostgreSQL: the distributed-sweep tests start their own server
  clang libclang-rt-dev  # libFuzzer (scripts/fuzz.sh) and its sanitizer runtimes
  g++-aarch64-linux-gnu)  # cross compiler: scripts/check-aarch64.sh proves kiln's C++ compiles for arm64
PYTHON="${PYTHON:-python3}"

missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  echo "kiln setup: installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# torch first, pinned: the CPU wheel. An unpinned torch pulls a multi-GB CUDA build.
"$PYTHON" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PYTHON" -m pip install --quiet --disable-pip-version-check "scikit-build-core>=0.10" "pybind11>=2.13"
# --no-build-isolation: the extension must compile against the torch installed above.
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[dev]"
"$PYTHON" -c "import kiln; print('kiln', kiln.__version__, 'ready: C++ core loaded')"
