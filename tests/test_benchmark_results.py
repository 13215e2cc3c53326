"""The benchmark results committed under benchmarks/results: summaries, small enough for git."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
RESULTS = sorted((BENCHMARKS / "results").rglob("*.json"))


def load_conftest():
    """benchmarks/conftest.py by path (it is not a package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_conftest", BENCHMARKS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LIMIT = load_conftest().RESULTS_SIZE_LIMIT


def test_there_are_results():
    assert RESULTS


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: str(p.relative_to(BENCHMARKS)))
def test_a_result_file_is_a_small_summary(path):
    size = path.stat().st_size
    assert size <= LIMIT, (f"{path.name} is {size:,} bytes, over {LIMIT:,}: commit statistics, not every round "
                           "(benchmarks/conftest.py trims what --benchmark-json writes)")
    data = json.loads(path.read_text())
    for bench in data.get("benchmarks", ()) if isinstance(data, dict) else ():
        assert "median" in bench["stats"], bench["name"]


def test_written_json_keeps_the_statistics_not_the_rounds():
    output = {"benchmarks": [{"name": "a", "stats": {"median": 1.0, "rounds": 3, "data": [1.0, 0.9, 1.1]}},
                             {"name": "b", "stats": {"median": 2.0}}]}
    load_conftest().trim_rounds(output)
    assert output["benchmarks"] == [{"name": "a", "stats": {"median": 1.0, "rounds": 3}},
                                    {"name": "b", "stats": {"median": 2.0}}]
