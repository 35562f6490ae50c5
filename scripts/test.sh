#!/usr/bin/env bash
# kiln's whole test suite: set-up, the C++ core's GoogleTest suite (ctest), then pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"

bash scripts/setup.sh

echo "kiln tests: C++ core (GoogleTest via ctest)"
cmake --preset release -DPython3_EXECUTABLE="$(command -v "$PYTHON")" >/dev/null
cmake --build --preset release
ctest --preset release --parallel 2

echo "kiln tests: Python (pytest)"
"$PYTHON" -m pytest tests "$@"
