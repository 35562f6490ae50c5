#!/usr/bin/env bash
# kiln's demo on the embedded sample data: set-up, then the template's pipeline.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"

bash scripts/setup.sh

# The apps' defaults read ./data/raw; on a fresh clone it starts as a copy of the embedded sample.
if [[ ! -e data/raw ]]; then
  echo "kiln demo: data/raw does not exist; copying the embedded sample (data/sample) there"
  cp -r data/sample data/raw
fi

echo "kiln demo: preparing data (python src/process_data.py)"
"$PYTHON" src/process_data.py

echo "kiln demo: training, tracked in ./mlruns (python src/train_model.py epochs=3)"
"$PYTHON" src/train_model.py epochs=3
# Training keeps each run's checkpoint in models/<MLflow run id>/: the newest is this run's.
# shellcheck disable=SC2012  # run ids are hex: ls -t is safe, and the simplest "newest first"
RUN_ID="$(ls -t models | head -n 1)"

echo "kiln demo: hyperparameter sweep, the template's 3 Optuna trials (python src/train_model.py --multirun epochs=1)"
"$PYTHON" src/train_model.py --multirun epochs=1

echo "kiln demo: batch inference on the sample's test sneakers (python src/batch_inferencing.py)"
"$PYTHON" src/batch_inferencing.py inference.model_path="models/$RUN_ID" \
  inference.input_data_dir=data/sample/test/7_Sneaker hydra.run.dir=outputs/demo-batch-inference
head -n 2 outputs/demo-batch-inference/batch-infer-res.jsonl

echo "kiln demo: serving run $RUN_ID (gunicorn kiln_fastapi.main:APP ... --chdir src) and asking for one prediction"
PORT="${KILN_DEMO_PORT:-8080}"
mkdir -p logs
PRED_MODEL_UUID="$RUN_ID" PRED_MODEL_PATH="$PWD/models/$RUN_ID" "$PYTHON" -m gunicorn kiln_fastapi.main:APP \
  -b "127.0.0.1:$PORT" -w 2 -k uvicorn.workers.UvicornWorker --chdir src >logs/demo-server.log 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat logs/demo-server.log; exit 1; }
  sleep 0.5
done
SNEAKERS=(data/sample/test/7_Sneaker/*.png)
curl -sf -X POST "http://127.0.0.1:$PORT/api/v1/model/predict" -F "files=@${SNEAKERS[0]}"
echo
kill "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
trap - EXIT

echo "kiln demo: done. See the runs with:"
echo "  MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri ./mlruns   # then open http://127.0.0.1:5000"
