#!/usr/bin/env bash
# Training throughput, headstart's loop vs a plain PyTorch loop: see bench/gpu.py. Needs only torch,
# timm, numpy, tqdm and safetensors (no prefect, mlflow, dvc, no network). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
# A GPU box runs this from a plain checkout, without `make setup`'s installed package: import this checkout's code.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# --stages DIR: then the default pipeline's stages on the GPU, each timed (bench/gpu_stages.py), on the
# Fashion-MNIST files in DIR.
if [ "${1:-}" = "--stages" ]; then
  "${PYTHON:-python3}" bench/gpu.py
  exec "${PYTHON:-python3}" bench/gpu_stages.py --source "$2"
fi
exec "${PYTHON:-python3}" bench/gpu.py "$@"
