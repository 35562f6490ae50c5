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

echo "kiln demo: hyperparameter sweep, the template's 3 Optuna trials (python src/train_model.py --multirun epochs=1)"
"$PYTHON" src/train_model.py --multirun epochs=1

echo "kiln demo: done. See the runs with:"
echo "  MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri ./mlruns   # then open http://127.0.0.1:5000"
