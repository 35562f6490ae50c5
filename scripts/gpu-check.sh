#!/usr/bin/env bash
# Checks every CUDA path of kiln on a machine with NVIDIA GPUs and a CUDA build of torch, in one
# command (CI has no GPU): builds kiln against the installed torch, then
#   1. trains on `cuda` in fp32 and bf16 (python src/train_model.py no_cuda=false), checks accuracy;
#   2. trains data-parallel with NCCL on every visible GPU (torchrun --nproc-per-node <GPUs>; with one
#      GPU a world of 1, which still runs the NCCL path), and checks that it matches itself across ranks;
#   3. batch inference on the GPU (python src/batch_inferencing.py no_cuda=true|false, same predictions);
#   4. serving on the GPU (gunicorn with NO_CUDA=false; the worker must hold a CUDA context);
#   5. GPU figures: training images/s (fp32, bf16), prediction images/s, bench/distributed.py on NCCL.
# Prints PASS/FAIL per check with its figures, and exits non-zero when any check failed. Needs no
# network: the embedded Fashion-MNIST sample is the data. Takes a few minutes (target: under 10).
#
#   scripts/gpu-check.sh
#   PYTHON=/opt/conda/bin/python OpenCV_DIR=/opt/opencv/lib/cmake/opencv4 scripts/gpu-check.sh
#
# Environment: PYTHON (default python3), OpenCV_DIR / CMAKE_PREFIX_PATH / CUDAToolkit_ROOT (passed to
# CMake), KILN_GPU_CHECK_SKIP_BUILD=1 to use the kiln already installed, KILN_GPU_CHECK_DIR for the
# scratch dir (default: a new temp dir, kept and printed).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO="$(pwd)"
PYTHON="${PYTHON:-python3}"
WORK="${KILN_GPU_CHECK_DIR:-$(mktemp -d -t kiln-gpu-check-XXXXXX)}"
mkdir -p "$WORK"
started=$SECONDS
failures=()

say() { printf '%s\n' "$*"; }
pass() { say "PASS  $1${2:+  ($2)}"; }
fail() {
  say "FAIL  $1${2:+  ($2)}"
  failures+=("$1")
}
# Runs a step with a time limit, its output in $WORK/<name>.log; prints the log's tail when it fails.
step() {
  local name="$1" limit="$2"
  shift 2
  if timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1; then
    return 0
  fi
  say "----- $name failed; last lines of $WORK/$name.log:"
  tail -n 25 "$WORK/$name.log"
  say "-----"
  return 1
}

say "kiln GPU check: scratch dir $WORK"
if ! command -v nvidia-smi >/dev/null; then
  say "nvidia-smi not found: this script needs a machine with NVIDIA GPUs"
  exit 2
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | sed 's/^/      GPU /'
if ! "$PYTHON" - <<'EOF'; then
import sys
import torch
ok = torch.cuda.is_available() and torch.version.cuda is not None
print(f"      torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s) visible, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if ok else '-'}")
sys.exit(0 if ok else 1)
EOF
  say "torch in $PYTHON has no CUDA (a CPU build, or no visible GPU): install a CUDA build of torch"
  exit 2
fi
GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"

# --- build ------------------------------------------------------------------------------------------
if [[ "${KILN_GPU_CHECK_SKIP_BUILD:-0}" != 1 ]]; then
  cmake_args=()
  [[ -n "${OpenCV_DIR:-}" ]] && cmake_args+=("-DOpenCV_DIR=${OpenCV_DIR}")
  [[ -n "${CUDAToolkit_ROOT:-}" ]] && cmake_args+=("-DCUDAToolkit_ROOT=${CUDAToolkit_ROOT}")
  # A CUDA build of torch makes CMake look for the CUDA toolkit; without nvcc on PATH, the CUDA
  # headers and libraries pip installed with torch (nvidia/cu*/ with include/cuda_runtime.h) serve.
  if [[ -z "${CUDAToolkit_ROOT:-}" ]] && ! command -v nvcc >/dev/null && [[ ! -d /usr/local/cuda ]]; then
    pip_cuda="$("$PYTHON" - <<'EOF'
import glob, os, site
for root in site.getsitepackages():
    for header in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include", "cuda_runtime.h"))):
        print(os.path.dirname(os.path.dirname(header)))
        raise SystemExit
EOF
)"
    if [[ -n "$pip_cuda" ]]; then
      say "      no nvcc or /usr/local/cuda: CUDAToolkit_ROOT=$pip_cuda (torch's pip CUDA packages)"
      cmake_args+=("-DCUDAToolkit_ROOT=$pip_cuda")
    fi
  fi
  build_started=$SECONDS
  if CMAKE_ARGS="${CMAKE_ARGS:-} ${cmake_args[*]}" step build 900 \
    "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e "$REPO"; then
    pass "build" "$((SECONDS - build_started)) s"
  else
    fail "build" "pip install -e . against $("$PYTHON" -c 'import torch; print(torch.__version__)')"
    say "Cannot go on without kiln built. Failed: ${failures[*]}"
    exit 1
  fi
fi
if ! "$PYTHON" -c "import kiln" 2>"$WORK/import.log"; then
  fail "import kiln" "$(tail -n 1 "$WORK/import.log")"
  exit 1
fi

# --- data -------------------------------------------------------------------------------------------
DATA="$WORK/processed"
if ! step prepare 300 "$PYTHON" -c "import kiln; kiln.prepare_dataset('$REPO/data/sample', '$DATA')"; then
  fail "prepare the sample"
  exit 1
fi

# Reads metrics from a training's stdout log: the last 'Epoch N:' line.
last_epoch_line() { grep -E "kiln.training - INFO - Epoch [0-9]+:" "$1" | tail -n 1 | sed 's/.*INFO - //'; }
accuracy_of() { last_epoch_line "$1" | sed -E 's/.*test accuracy ([0-9.]+).*/\1/'; }

# --- 1. training on cuda, fp32 and bf16 ---------------------------------------------------------------
for precision in fp32 bf16; do
  if step "train-$precision" 300 "$PYTHON" src/train_model.py "data_dir_path=$DATA" no_cuda=false \
    "precision=$precision" epochs=2 setup_mlflow=false "artifact_dir_path=$WORK/models-$precision" \
    "log_dir=$WORK/logs" "hydra.run.dir=$WORK/outputs/train-$precision"; then
    accuracy="$(accuracy_of "$WORK/train-$precision.log")"
    if grep -q "on cuda" "$WORK/train-$precision.log" && awk "BEGIN{exit !($accuracy >= 0.6)}"; then
      pass "train on cuda, $precision" "$(last_epoch_line "$WORK/train-$precision.log")"
    else
      fail "train on cuda, $precision" "device or accuracy wrong: $(last_epoch_line "$WORK/train-$precision.log")"
    fi
  else
    fail "train on cuda, $precision"
  fi
done

# --- 1b. streaming from the shards and augmenting on cuda (pinned batch buffers, copies to the GPU) -------
if step train-streamed 300 "$PYTHON" - "$DATA" <<'EOF'; then
import sys

import kiln
from kiln import transforms

data = sys.argv[1]
config = {"train": {"random_resized_crop": {"size": 24, "scale": [0.6, 1.0]}, "horizontal_flip": 0.5},
          "eval": {"center_crop": 24}}
common = dict(device="cuda", seed=3, train_limit=4000, test_limit=1000)
resident = kiln.Trainer(data, **common)
streamed = kiln.Trainer(data, data_memory_budget=1, num_workers=4, **common)
assert streamed.streams_data and not resident.streams_data
a, b = resident.run_epoch(), streamed.run_epoch()
for key in ("train_loss", "test_loss", "test_accuracy"):
    assert abs(a[key] - b[key]) <= 1e-3 * max(1.0, abs(a[key])), (key, a[key], b[key])
augmented = kiln.Trainer(data, data_memory_budget=1, train_transform=transforms.train_options(config),
                         eval_transform=transforms.eval_options(config), **common)
for _ in range(2):
    metrics = augmented.run_epoch()
assert augmented.input_shape[1:] == (24, 24) and metrics["test_accuracy"] >= 0.4, metrics
print(f"streamed = resident on cuda (test accuracy {b['test_accuracy']:.4f}); augmented 24 px crops: "
      f"test accuracy {metrics['test_accuracy']:.4f}, data wait {metrics['data_wait_seconds']:.2f} s")
EOF
  pass "streamed and augmented training on cuda" "$(tail -n 1 "$WORK/train-streamed.log")"
else
  fail "streamed and augmented training on cuda"
fi

# --- 2. NCCL data-parallel on every GPU ------------------------------------------------------------------
DP_OUT="$WORK/dp"
mkdir -p "$DP_OUT"
cat >"$WORK/dp_worker.py" <<'EOF'
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import kiln

data, out = sys.argv[1], sys.argv[2]
rank = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(rank)
dist.init_process_group("nccl", timeout=timedelta(seconds=120), device_id=torch.device(f"cuda:{rank}"))
for precision in ("fp32", "bf16"):
    for model in ("mnist_cnn", "resnet8"):
        trainer = kiln.Trainer(data, model=model, precision=precision, device=f"cuda:{rank}", train_limit=1024,
                               test_limit=300, seed=3, process_group=dist.group.WORLD.group_name)
        metrics = trainer.run_epoch()
        trainer.save_checkpoint(f"{out}/{model}-{precision}-rank{dist.get_rank()}.pt")
        if dist.get_rank() == 0:
            print(f"{model} {precision} world {dist.get_world_size()} backend {dist.get_backend()}: "
                  f"test accuracy {metrics['test_accuracy']:.3f}, {metrics['seconds']:.2f} s, "
                  f"communication {metrics['communication_seconds']:.3f} s", flush=True)
dist.destroy_process_group()
EOF
if step nccl 300 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$GPUS" "$WORK/dp_worker.py" \
  "$DATA" "$DP_OUT"; then
  if "$PYTHON" - "$DP_OUT" "$GPUS" >"$WORK/nccl-compare.log" 2>&1 <<'EOF'; then
import sys
from pathlib import Path

import torch

out, world = Path(sys.argv[1]), int(sys.argv[2])
for model in ("mnist_cnn", "resnet8"):
    for precision in ("fp32", "bf16"):
        states = [torch.load(out / f"{model}-{precision}-rank{r}.pt", weights_only=True)["model"]["state_dict"]
                  for r in range(world)]
        for name in states[0]:
            assert all(torch.equal(states[0][name], s[name]) for s in states[1:]), (model, precision, name)
print(f"weights bitwise identical on {world} rank(s)")
EOF
    pass "NCCL data-parallel on $GPUS GPU(s)" "$(cat "$WORK/nccl-compare.log"); $(grep -E '^(mnist_cnn|resnet8) ' "$WORK/nccl.log" | paste -sd ';' -)"
  else
    fail "NCCL data-parallel on $GPUS GPU(s)" "ranks differ: $(tail -n 1 "$WORK/nccl-compare.log")"
  fi
else
  fail "NCCL data-parallel on $GPUS GPU(s)"
fi

# The Hydra app under torchrun on every GPU: one tracked run, rank 0 writes the checkpoint.
if step torchrun-app 300 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$GPUS" \
  src/train_model.py "data_dir_path=$DATA" no_cuda=false epochs=2 "mlflow_tracking_uri=$WORK/mlruns" \
  "artifact_dir_path=$WORK/models-dp" "log_dir=$WORK/logs" "hydra.run.dir=$WORK/outputs/train-dp"; then
  if ls "$WORK"/models-dp/*/checkpoint.pt >/dev/null 2>&1 && grep -q "ranks (nccl)" "$WORK/torchrun-app.log"; then
    pass "torchrun src/train_model.py on $GPUS GPU(s)" "$(last_epoch_line "$WORK/torchrun-app.log")"
  else
    fail "torchrun src/train_model.py on $GPUS GPU(s)" "no checkpoint, or not on NCCL"
  fi
else
  fail "torchrun src/train_model.py on $GPUS GPU(s)"
fi

CHECKPOINT="$(ls "$WORK"/models-fp32/checkpoint.pt 2>/dev/null)"
if [[ -z "$CHECKPOINT" ]]; then
  fail "inference and serving" "no checkpoint from the fp32 training"
else
  # --- 3. batch inference on the GPU ---------------------------------------------------------------------
  inference_ok=true
  for where in cpu gpu; do
    no_cuda=true
    [[ "$where" == gpu ]] && no_cuda=false
    step "infer-$where" 300 "$PYTHON" src/batch_inferencing.py "inference.model_path=$CHECKPOINT" \
      "inference.input_data_dir=$REPO/data/sample/test" 'inference.file_check_glob="**/*.png"' \
      inference.precision=fp32 "no_cuda=$no_cuda" "log_dir=$WORK/logs" \
      "hydra.run.dir=$WORK/outputs/infer-$where" || inference_ok=false
  done
  if $inference_ok && "$PYTHON" - "$WORK/outputs" >"$WORK/infer-compare.log" 2>&1 <<'EOF'; then
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
cpu, gpu = ([json.loads(line) for line in (out / f"infer-{w}" / "batch-infer-res.jsonl").open()] for w in ("cpu", "gpu"))
assert len(cpu) == len(gpu) > 0
same = sum(a["prediction"] == b["prediction"] for a, b in zip(cpu, gpu))
assert same >= 0.99 * len(cpu), f"{same} of {len(cpu)} predictions equal"
print(f"{len(gpu)} images, {same / len(cpu):.2%} of predictions equal to the CPU's")
EOF
    pass "batch inference on the GPU" "$(cat "$WORK/infer-compare.log")"
  else
    fail "batch inference on the GPU" "$(tail -n 1 "$WORK/infer-compare.log" 2>/dev/null)"
  fi

  # --- 4. serving on the GPU ---------------------------------------------------------------------------
  port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  NO_CUDA=false PRED_MODEL_PATH="$CHECKPOINT" PRED_MODEL_UUID=gpu-check \
    "$PYTHON" -m gunicorn kiln_fastapi.main:APP --chdir src -b "127.0.0.1:$port" -w 1 \
    -k uvicorn.workers.UvicornWorker >"$WORK/serve.log" 2>&1 &
  server=$!
  if "$PYTHON" - "$port" "$REPO/data/sample/test" >"$WORK/serve-check.log" 2>&1 <<'EOF'; then
import base64
import json
import sys
import time
import urllib.request
from pathlib import Path

port, images = sys.argv[1], sorted(Path(sys.argv[2]).rglob("*.png"))[:64]
url = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 120
while True:
    try:
        urllib.request.urlopen(f"{url}/api/v1/model/version", timeout=5).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
body = json.dumps({"images": [{"id": i, "image": base64.b64encode(p.read_bytes()).decode()} for i, p in enumerate(images)]})
request = urllib.request.Request(f"{url}/api/v1/model/predict", data=body.encode(), headers={"Content-Type": "application/json"})
started = time.monotonic()
for _ in range(20):
    answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
seconds = time.monotonic() - started
print(f"{len(images)}-image requests: {20 * len(images) / seconds:.0f} images/s over HTTP; answer keys {sorted(answer)}")
EOF
    # The worker must hold a CUDA context: nvidia-smi lists it among the compute processes, or (in a
    # container, where nvidia-smi shows the host's process ids) it has the GPU's device files open.
    workers="$(pgrep -P "$server" | paste -sd '|' -)"
    on_gpu=false
    if [[ -n "$workers" ]]; then
      if nvidia-smi --query-compute-apps=pid --format=csv,noheader | grep -qE "^($workers)$"; then
        on_gpu=true
      fi
      for worker in ${workers//|/ }; do
        for fd in /proc/"$worker"/fd/*; do
          [[ "$(readlink "$fd" 2>/dev/null)" =~ ^/dev/nvidia[0-9]+$ ]] && on_gpu=true
        done
      done
    fi
    if $on_gpu; then
      pass "serving on the GPU" "$(cat "$WORK/serve-check.log")"
    else
      fail "serving on the GPU" "answered, but no gunicorn worker holds a CUDA context: $(cat "$WORK/serve-check.log")"
    fi
  else
    fail "serving on the GPU" "$(tail -n 1 "$WORK/serve-check.log"); server log: $WORK/serve.log"
  fi
  kill "$server" 2>/dev/null
  wait "$server" 2>/dev/null

  # --- 5. GPU figures ----------------------------------------------------------------------------------
  if step figures 300 "$PYTHON" - "$DATA" "$CHECKPOINT" <<'EOF'; then
import sys
import time

import torch

import kiln

data, checkpoint = sys.argv[1], sys.argv[2]
for model in ("mnist_cnn", "resnet8"):
    for precision in ("fp32", "bf16"):
        trainer = kiln.Trainer(data, model=model, precision=precision, device="cuda", train_batch_size=128, seed=1)
        trainer.run_epoch()  # warm-up: cuDNN autotuning, allocator
        epochs = [trainer.run_epoch() for _ in range(2)]
        seconds = min(e["seconds"] for e in epochs)
        print(f"train {model} {precision} bs128: {trainer.train_size / seconds:.0f} images/s per epoch "
              f"(train + test), test accuracy {epochs[-1]['test_accuracy']:.3f}")
images = kiln.load_split(data, "test")[0]
for precision in ("fp32", "bf16"):
    predictor = kiln.Predictor(checkpoint, device="cuda", precision=precision)
    predictor.predict(images[:256])
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        predictor.predict(images)
    torch.cuda.synchronize()
    print(f"predict mnist_cnn {precision}: {20 * images.shape[0] / (time.perf_counter() - started):.0f} images/s")
EOF
    pass "GPU figures" "see below"
    sed 's/^/      /' "$WORK/figures.log"
  else
    fail "GPU figures"
  fi
fi

nprocs="1,$GPUS"
((GPUS == 1)) && nprocs=1
if step bench-distributed 400 "$PYTHON" bench/distributed.py --device cuda --nprocs "$nprocs" --precision bf16 \
  --global-batch $((64 * GPUS)) --epochs 3 --json "$WORK/bench-distributed.json"; then
  pass "bench/distributed.py on NCCL (1 vs $GPUS GPU(s))" "see below"
  sed 's/^/      /' "$WORK/bench-distributed.log"
else
  fail "bench/distributed.py on NCCL"
fi

say "kiln GPU check: $((SECONDS - started)) s, logs in $WORK"
if ((${#failures[@]})); then
  say "FAILED: ${failures[*]}"
  exit 1
fi
say "all checks passed"
