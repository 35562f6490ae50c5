"""kiln's model server: FastAPI over the C++ predictor.

    gunicorn kiln_fastapi.main:APP -b 0.0.0.0:8080 -w 4 -k uvicorn.workers.UvicornWorker --chdir src

Settings come from the environment (see :mod:`kiln_fastapi.config`).
"""
