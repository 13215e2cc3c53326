#!/usr/bin/env bash
# The Triton kernels on this machine's NVIDIA GPU: their tests natively on CUDA, then their
# benchmarks into benchmarks/results/gpu_<gpu name>.json. Everything within 8 minutes.
#
#   bash benchmarks/gpu_check.sh
#
# Uses the active virtual environment, else .venv in the checkout (created if missing), and
# installs what is missing: torch (PyPI's default wheel, the CUDA build), triton, and this
# package in editable mode with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

DEADLINE=$((SECONDS + 480))
left() {  # seconds left before the deadline; fails once it has passed
    local n=$((DEADLINE - SECONDS))
    if ((n <= 0)); then
        echo "gpu_check: out of time (8 minutes)" >&2
        return 1
    fi
    echo "$n"
}

nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU visible (nvidia-smi failed)" >&2; exit 1; }

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
PY=python

if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    # a missing torch, or a CPU-only build: replace it with PyPI's default (CUDA) wheel
    timeout "$(left)" $PY -m pip install -q --upgrade pip "setuptools>=68" wheel
    $PY -m pip uninstall -y -q torch 2>/dev/null || true
    timeout "$(left)" $PY -m pip install -q torch
    $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
        echo "gpu_check: the torch installed cannot use the GPU (a CPU-only wheel, or a driver too old)" >&2
        exit 1
    }
fi
$PY -c 'import triton' 2>/dev/null || timeout "$(left)" $PY -m pip install -q triton
# from outside the checkout, so that only an installed ttsearch (with its kernels) counts
if ! (cd / && $PY -c 'import ttsearch.kernels, pytest_benchmark') 2>/dev/null; then
    timeout "$(left)" $PY -m pip install -q --no-build-isolation -e '.[test]'
fi
(cd / && $PY -c 'import ttsearch.kernels') || {
    echo "gpu_check: ttsearch.kernels is not importable after installing: the package must list it" >&2
    exit 1
}
$PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
"triton", triton.__version__, "gpu", torch.cuda.get_device_name())'

timeout "$(left)" $PY -m pytest tests/test_triton_kernels.py tests/test_ops.py -q

NAME=$($PY -c 'import re, torch; print(re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_").lower())')
mkdir -p benchmarks/results
timeout "$(left)" $PY -m pytest benchmarks/bench_triton.py --benchmark-only \
    --benchmark-json "benchmarks/results/gpu_${NAME}.json" -q
echo "gpu_check: results in benchmarks/results/gpu_${NAME}.json"
