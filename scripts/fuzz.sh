#!/usr/bin/env bash
# Coverage-guided fuzzing of kiln's image decoders: libFuzzer with ASan/UBSan over the header reader,
# the PNG fast path and decode_into/probe_image (fuzz/decode_fuzzer.cpp), seeded with valid images of
# every format kiln decodes, written fresh by fuzz/make_seeds.cpp.
# Usage: scripts/fuzz.sh [seconds]   (default 60, as CI runs it; e.g. 3600 for an hour on demand)
# The corpus grows in build/fuzz/corpus across runs; a crash, leak, timeout (10 s per input) or broken
# decoder promise stops the run with the input saved under build/fuzz/artifacts/ and exit status 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
FUZZ_SECONDS="${1:-60}"
BUILD=build/fuzz

cmake -S fuzz -B "$BUILD" -G Ninja -DCMAKE_CXX_COMPILER=clang++ >/dev/null
cmake --build "$BUILD" >/dev/null
rm -rf "$BUILD/seeds"
"$BUILD/make_seeds" "$BUILD/seeds"
mkdir -p "$BUILD/corpus" "$BUILD/artifacts"

echo "kiln fuzz: decoders for ${FUZZ_SECONDS}s (log: $BUILD/fuzz.log)"
status=0
"$BUILD/decode_fuzzer" "$BUILD/corpus" "$BUILD/seeds" -max_total_time="$FUZZ_SECONDS" -timeout=10 \
  -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$BUILD/artifacts/" >"$BUILD/fuzz.log" 2>&1 || status=$?
if ((status != 0)); then
  tail -n 60 "$BUILD/fuzz.log"
  echo "kiln fuzz: FAILED (exit $status); the input is in $BUILD/artifacts/" >&2
  exit 1
fi
executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$BUILD/fuzz.log")
corpus=$(find "$BUILD/corpus" -type f | wc -l)
echo "kiln fuzz: ${executions} executions in ${FUZZ_SECONDS}s, no failure; corpus ${corpus} inputs"
