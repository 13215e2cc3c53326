#!/usr/bin/env bash
# The CUDA side of ttsearch on this machine's NVIDIA GPU, within 8 minutes in all:
#
#   1. the CUDA graph and engine tests (tests/test_cuda_graphs.py, the CUDA cases of tests/test_ops_checks.py);
#   2. the Triton kernels natively on CUDA (the Triton cases of tests/test_ops_*.py without their
#      interpreter cases, which `make test` runs on any machine);
#   3. the Triton benchmarks (benchmarks/bench_triton.py: decode, cascade, extend, store,
#      copy against this GPU's copy bandwidth) into benchmarks/results/gpu_<gpu name>.json;
#   4. end-to-end decode of a 1B-shaped Llama with and without CUDA graphs
#      (benchmarks/bench_gpu_decode.py) into benchmarks/results/gpu_<gpu name>_decode.json;
#   5. tests/test_batch_invariant.py (CPU engines today) with the time that is left.
#
# Each stage runs under a timeout taken from what is left, keeping time for the stages
# after it; a stage that fails or times out is reported and the next one still runs. The
# script fails if any stage did. Test results also go to
# benchmarks/results/gpu_<gpu name>_tests*.xml (JUnit).
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

slot() {  # slot CAP RESERVE: seconds for the next stage, at most CAP, keeping RESERVE for the stages after it
    local n
    n=$(left) || return 1
    n=$((n - $2))
    if ((n > $1)); then
        n=$1
    fi
    if ((n < 10)); then
        echo "gpu_check: too little time left for this stage (${n}s)" >&2
        return 1
    fi
    echo "$n"
}

FAILED=()
stage() {  # stage NAME CAP RESERVE COMMAND...: COMMAND under a timeout from slot; failures are recorded
    local name=$1 cap=$2 reserve=$3 seconds rc=0
    shift 3
    if ! seconds=$(slot "$cap" "$reserve"); then
        FAILED+=("$name: not run (out of time)")
        return 0
    fi
    echo "gpu_check: $name (at most ${seconds}s, $(left)s left)"
    timeout -k 10 "$seconds" "$@" || rc=$?
    if ((rc == 124 || rc == 137)); then
        FAILED+=("$name: timed out after ${seconds}s")
    elif ((rc != 0)); then
        FAILED+=("$name: exit status $rc")
    fi
}

nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU visible (nvidia-smi failed)" >&2; exit 1; }

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
PY=python
# the versions the suite passed with (pip new enough for --group first)
PIP=("$PY" -m pip install -q -c constraints.txt)
timeout "$(left)" "${PIP[@]}" pip setuptools wheel

if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    # a missing torch, or a CPU-only build: replace it with PyPI's (CUDA) wheel of the locked version
    $PY -m pip uninstall -y -q torch 2>/dev/null || true
    timeout "$(left)" "${PIP[@]}" torch
    $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
        echo "gpu_check: the torch installed cannot use the GPU (a CPU-only wheel, or a driver too old)" >&2
        exit 1
    }
fi
$PY -c 'import triton' 2>/dev/null || timeout "$(left)" "${PIP[@]}" triton
# from outside the checkout, so that only an installed ttsearch (with its kernels) counts
if ! (cd / && $PY -c 'import ttsearch.kernels, pytest_benchmark') 2>/dev/null; then
    timeout "$(left)" "${PIP[@]}" --no-build-isolation -e . --group test
fi
(cd / && $PY -c 'import ttsearch.kernels') || {
    echo "gpu_check: ttsearch.kernels is not importable after installing: the package must list it" >&2
    exit 1
}
$PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
"triton", triton.__version__, "gpu", torch.cuda.get_device_name())'

NAME=$($PY -c 'import re, torch; print(re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_").lower())')
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider)

# (cap, reserve) per stage: the caps sum to about the budget, the reserves keep the benchmarks' time
stage "CUDA graph and engine tests" 120 330 "${PYTEST[@]}" tests/test_cuda_graphs.py tests/test_ops_checks.py -k cuda \
    --junitxml "$RESULTS/gpu_${NAME}_tests_engine.xml"
stage "Triton kernel tests on CUDA" 150 210 "${PYTEST[@]}" tests/test_ops_*.py \
    -k "(triton or cuda) and not cpu" --junitxml "$RESULTS/gpu_${NAME}_tests_kernels.xml"
stage "Triton benchmarks" 100 120 "${PYTEST[@]}" benchmarks/bench_triton.py --benchmark-only \
    --benchmark-json "$RESULTS/gpu_${NAME}.json"
stage "GPU decode benchmark" 180 0 "${PYTEST[@]}" benchmarks/bench_gpu_decode.py --benchmark-only \
    --benchmark-json "$RESULTS/gpu_${NAME}_decode.json"
stage "batch-invariant tests" 240 0 "${PYTEST[@]}" tests/test_batch_invariant.py \
    --junitxml "$RESULTS/gpu_${NAME}_tests_batch_invariant.xml"

echo "gpu_check: results in $RESULTS/gpu_${NAME}*.json and $RESULTS/gpu_${NAME}_tests*.xml (${SECONDS}s)"
if ((${#FAILED[@]})); then
    printf 'gpu_check: FAILED: %s\n' "${FAILED[@]}" >&2
    exit 1
fi
echo "gpu_check: all stages passed"
