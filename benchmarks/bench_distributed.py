"""Problems/s on Ray workers: the same 16 bundled problems (SmolLM2, the arithmetic checker,
the demo's settings, beam search n=8, M=4) on 1 and on 2 workers of one thread each, with
the driver's own time per record (receiving, writing, handing out). Both runs search the
same problems with the same seeds: their tokens per problem are reported side by side."""

from __future__ import annotations

import time

from ttsearch.demo import DEMO_SETTINGS
from ttsearch.search import run
from ttsearch.search.config import SearchConfig
from ttsearch.search.results import read_results

PROBLEMS = 16
SETTINGS = {**DEMO_SETTINGS, "strategy": "beam_search", "n": 8, "beam_width": 4, "problems_in_flight": 8}


def spread(tmp_path, workers: int) -> dict:
    out = tmp_path / f"workers-{workers}.jsonl"
    start = time.perf_counter()
    stats = run(SearchConfig(**SETTINGS), out, limit=PROBLEMS, progress=False, workers=workers, worker_threads=1)
    seconds = time.perf_counter() - start
    records = read_results(out)
    return {"workers": workers, "seconds": seconds, "problems_per_s": len(records) / seconds,
            "driver_seconds_per_record": stats["driver_seconds_per_record"],
            "generated_tokens_per_problem": sum(r["tokens_generated"] for r in records) / len(records)}


def test_problems_per_second_on_one_and_two_workers(benchmark, tmp_path):
    one = spread(tmp_path, 1)
    two = benchmark.pedantic(lambda: spread(tmp_path, 2), rounds=1, iterations=1)
    benchmark.extra_info.update({"problems": PROBLEMS, "settings": SETTINGS, "one_worker": one, "two_workers": two,
                                 "speedup": two["problems_per_s"] / one["problems_per_s"]})
