"""Shared setup of the benchmark suites: what machine and software produced the numbers.

Run a suite with ``--benchmark-json benchmarks/results/<name>.json``; the hooks below add
to the json's ``machine_info`` what pytest-benchmark does not record itself, and keep each
benchmark's statistics but not its every round's time (a fast op runs tens of thousands of
rounds: ``bench_ops.py`` wrote 8.7 MB). Committed results stay under
``RESULTS_SIZE_LIMIT`` bytes (``tests/test_benchmark_results.py`` checks). The rounds' times
go to pytest-benchmark's own storage, ``.benchmarks/`` (not in git), with
``--benchmark-autosave --benchmark-save-data``.
"""

from __future__ import annotations

import os
import platform


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags(wanted=("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")) -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [flag for flag in wanted if flag in flags]
    except OSError:
        pass
    return []


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    machine_info["cpu_model"] = _cpu_model()
    machine_info["cpu_flags"] = _cpu_flags()
    machine_info["logical_cpus"] = os.cpu_count()
    machine_info["torch_version"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
    try:
        import ttsearch.ops as ops
    except ImportError as exc:  # a suite that does not need the ops still runs
        machine_info["ops_implementation"] = f"unavailable: {exc}"
    else:
        machine_info["ops_mode"] = ops.MODE
        machine_info["ops_implementation"] = dict(ops.IMPLEMENTATIONS)


#: the most bytes a json under benchmarks/results may hold
RESULTS_SIZE_LIMIT = 200_000


def trim_rounds(output_json: dict) -> dict:
    """Drop every benchmark's per-round times (``stats["data"]``); the statistics stay."""
    for bench in output_json.get("benchmarks", ()):
        bench.get("stats", {}).pop("data", None)
    return output_json


def pytest_benchmark_update_json(config, benchmarks, output_json):
    trim_rounds(output_json)
