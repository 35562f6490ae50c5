#!/usr/bin/env bash
# Proves, on this x86-64 machine, that kiln's C++ compiles for aarch64 (a Linux arm64 VM, an Apple-silicon
# conda env): every translation unit of the core (cpp/src) and of the Python bindings (cpp/bindings), with the
# defines and include paths CMake gives it (build/check-aarch64/compile_commands.json), is compiled by the
# aarch64 cross compiler to an aarch64 object file (under build/check-aarch64/obj, through ccache when
# installed, so a rerun compiles only what changed).
# - Code generation, not -fsyntax-only: GCC checks target attributes such as target_clones("arch=x86-64-v3")
#   only when it generates code. -O0 instead of the build's -O3: the same checks, in less time.
# - Not linked and not run: there is no aarch64 LibTorch or OpenCV here, so this proves that the code
#   compiles, not how it behaves.
# - Headers are this machine's: LibTorch's, pybind11's and OpenCV's own are architecture-independent, but
#   OpenCV's cvconfig.h (/usr/include/<multiarch>/opencv4) and Python's pyconfig.h describe this x86-64 build;
#   both are LP64 with the same type sizes, which is enough for a compile check.
# - Not checked: cpp/tests and fuzz/ (test programs, not what `pip install` builds on an arm64 machine).
# Usage: scripts/check-aarch64.sh [jobs]   (default 2 compiles at a time; each takes up to ~1 GB of memory)
# Needs g++-aarch64-linux-gnu (scripts/setup.sh installs it); KILN_AARCH64_CXX names another cross compiler.
# Prints each translation unit, then a summary; exits 1 naming each one that failed, with the compiler's errors.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
JOBS="${1:-2}"
CROSS_CXX="${KILN_AARCH64_CXX:-aarch64-linux-gnu-g++}"
PYTHON="${PYTHON:-python3}"
BUILD=build/check-aarch64

if ! command -v "$CROSS_CXX" >/dev/null; then
  echo "check-aarch64: no aarch64 cross compiler '$CROSS_CXX' on PATH; install it with" \
    "'apt-get install g++-aarch64-linux-gnu' (scripts/setup.sh does) or set KILN_AARCH64_CXX" >&2
  exit 2
fi

# CMake's own view of every translation unit: the Python module too, so pybind11 comes from the active Python.
mkdir -p "$BUILD"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_EXPORT_COMPILE_COMMANDS=ON -DKILN_BUILD_PYTHON=ON -DKILN_BUILD_TESTS=OFF \
  -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$(command -v "$PYTHON")" \
  -DPython_EXECUTABLE="$(command -v "$PYTHON")" -Dpybind11_DIR="$("$PYTHON" -m pybind11 --cmakedir)" \
  >"$BUILD/cmake.log" 2>&1 ||
  {
    cat "$BUILD/cmake.log" >&2
    echo "check-aarch64: CMake could not configure $BUILD (log above)" >&2
    exit 1
  }

LOGS="$BUILD/logs"
rm -rf "$LOGS"
mkdir -p "$LOGS"
# One line per translation unit: "<path>\t<cross-compile command>". The host compiler becomes the cross one;
# x86-only options (-m...) and link-time optimisation go; headers the cross compiler's sysroot lacks
# (OpenCV, nlohmann_json, libdeflate under /usr/include) are searched after its own, so aarch64's glibc and
# libstdc++ headers still win.
LAUNCHER="$(command -v ccache || true)"
"$PYTHON" - "$BUILD/compile_commands.json" "$LAUNCHER $CROSS_CXX" "$(gcc -print-multiarch)" "$BUILD/obj" \
  >"$BUILD/units.tsv" <<'EOF'
import json, os, shlex, sys

commands, cross_cxx, multiarch, objects = sys.argv[1:]
repo = os.getcwd()
for entry in json.load(open(commands)):
    unit = os.path.relpath(entry["file"], repo)
    if not unit.startswith(("cpp/src/", "cpp/bindings/")):
        continue
    args = entry.get("arguments") or shlex.split(entry["command"])
    kept, skip = [], False
    for arg in args[1:]:
        if skip:
            skip = False
        elif arg == "-o":
            skip = True
        elif arg == "-c" or arg.startswith(("-m", "-flto", "-O")) or arg == "-fno-fat-lto-objects":
            continue
        else:
            kept.append(arg)
    after = ["-idirafter", "/usr/include"]
    opencv_config = f"/usr/include/{multiarch}/opencv4"
    if os.path.isdir(opencv_config):
        after += ["-idirafter", opencv_config]
    obj = os.path.join(objects, unit + ".o")
    os.makedirs(os.path.dirname(obj), exist_ok=True)
    cross = shlex.split(cross_cxx) + kept + after + ["-O0", "-c", "-o", obj]
    print(f"{unit}\t{shlex.join(cross)}")
EOF
units=$(wc -l <"$BUILD/units.tsv")
if ((units == 0)); then
  echo "check-aarch64: $BUILD/compile_commands.json names no file under cpp/src or cpp/bindings" >&2
  exit 1
fi

compile_unit() {
  local unit="${1%%$'\t'*}" command="${1#*$'\t'}"
  local log="$LOGS/${unit//\//_}.log" start=$SECONDS
  if (eval "$command") >"$log" 2>&1; then
    local warnings note=""
    warnings=$(grep -c ': warning:' "$log" || true)
    if ((warnings > 0)); then note=", $warnings warnings: $log"; fi
    echo "ok    $unit ($((SECONDS - start)) s$note)"
    # Shown, not only counted: a warning only aarch64 gives points at code that differs per architecture.
    grep -m 3 ': warning:' "$log" | sed 's/^/        /' || true
  else
    touch "$log.failed"
    echo "FAIL  $unit ($((SECONDS - start)) s)"
  fi
}
export -f compile_unit
export LOGS

echo "check-aarch64: $units translation units with $("$CROSS_CXX" --version | head -n 1), $JOBS at a time"
start=$SECONDS
# shellcheck disable=SC2016  # $1 is expanded by the bash that xargs starts: one line of units.tsv
xargs -d '\n' -n 1 -P "$JOBS" bash -c 'compile_unit "$1"' _ <"$BUILD/units.tsv"

failed=()
while IFS=$'\t' read -r unit _; do
  if [[ -e "$LOGS/${unit//\//_}.log.failed" ]]; then failed+=("$unit"); fi
done <"$BUILD/units.tsv"
for unit in "${failed[@]}"; do
  echo
  echo "check-aarch64: $unit does not compile for aarch64:"
  grep -m 3 -A 3 ': error' "$LOGS/${unit//\//_}.log" || tail -n 40 "$LOGS/${unit//\//_}.log"
  echo "($(grep -c ': error' "$LOGS/${unit//\//_}.log" || true) errors in all: $LOGS/${unit//\//_}.log)"
done

# Apple silicon builds with clang: with -Werror the ISA dispatch macro must expand to the plain function there,
# as on aarch64 Linux.
if command -v clang++ >/dev/null; then
  for target in aarch64-linux-gnu arm64-apple-macos; do
    if printf '%s\n' '#include "kiln/detail/isa_dispatch.hpp"' \
      'inline void twice_body(float* v, int n) { for (int i = 0; i < n; ++i) v[i] *= 2; }' \
      'KILN_ISA_VARIANTS(void, twice, (float* v, int n), twice_body(v, n))' |
      clang++ --target="$target" -std=c++20 -nostdinc++ -Werror -Icpp/include -x c++ -c -o /dev/null - \
        >"$LOGS/clang-$target.log" 2>&1; then
      echo "ok    cpp/include/kiln/detail/isa_dispatch.hpp with clang for $target"
    else
      echo "FAIL  cpp/include/kiln/detail/isa_dispatch.hpp with clang for $target"
      failed+=("kiln/detail/isa_dispatch.hpp (clang, $target)")
      cat "$LOGS/clang-$target.log"
    fi
  done
fi
echo
if ((${#failed[@]})); then
  echo "check-aarch64: FAILED, ${#failed[@]} do not compile for aarch64: ${failed[*]} (full logs in $LOGS)" >&2
  exit 1
fi
echo "check-aarch64: all $units translation units compile for aarch64 ($((SECONDS - start)) s, $JOBS at a time)"
