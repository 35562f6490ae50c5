#!/usr/bin/env bash
# kiln's whole test suite: set-up, the C++ core's GoogleTest suite (ctest), the image decoders' tests
# under ASan/UBSan and a bounded fuzz run (KILN_FUZZ_SECONDS, default 60), then pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"

bash scripts/setup.sh

echo "kiln tests: C++ core (GoogleTest via ctest)"
cmake --preset release -DPython3_EXECUTABLE="$(command -v "$PYTHON")" >/dev/null
cmake --build --preset release
ctest --preset release --parallel 2

echo "kiln tests: image decoders under AddressSanitizer + UBSan (GoogleTest via ctest, asan preset)"
cmake --preset asan >/dev/null
cmake --build --preset asan
ctest --preset asan --parallel 2

echo "kiln tests: fuzzing the image decoders (scripts/fuzz.sh, ${KILN_FUZZ_SECONDS:-60}s)"
bash scripts/fuzz.sh "${KILN_FUZZ_SECONDS:-60}"

echo "kiln tests: Python (pytest)"
"$PYTHON" -m pytest tests "$@"
