#!/usr/bin/env bash
# Training throughput, headstart's loop vs a plain PyTorch loop: see bench/gpu.py. Needs only torch,
# timm, numpy, tqdm and safetensors (no prefect, mlflow, dvc, no network). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu.py "$@"
