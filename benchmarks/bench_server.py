"""`ttsearch serve` under load: 64 requests (beam search, n=8, M=4) from 1 client and from 16
concurrent clients, to a server on loopback, through the official openai client.

Both runs send the same 64 questions with the same settings, and a reply follows its question
and seed alone (float32 here), so both do the same work: the tokens per request are reported
beside requests/s and the p50/p95 latency. With 16 clients their beams share decode batches.
"""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_serve import Server  # noqa: E402  (the tests' loopback server)

from ttsearch import Searcher  # noqa: E402
from ttsearch.eval.arithmetic import bundled_arithmetic_path  # noqa: E402
from ttsearch.eval.datasets import load_jsonl  # noqa: E402
from ttsearch.serve import SearchService, create_app  # noqa: E402

REQUESTS = 64
SETTINGS = dict(strategy="beam_search", n=8, beam_width=4, max_iterations=3, max_step_tokens=16, max_tokens=32,
                problems_in_flight=16)


def load(client, questions, clients: int) -> dict:
    latencies, work = [], []

    def ask(question):
        start = time.perf_counter()
        reply = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": question}])
        latencies.append(time.perf_counter() - start)
        work.append((reply.usage.completion_tokens, (reply.usage.model_extra or {}).get("verifier_tokens", 0)))
        return reply

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(ask, questions))
    wall = time.perf_counter() - start
    quantiles = statistics.quantiles(latencies, n=20)
    return {
        "clients": clients,
        "requests": len(questions),
        "seconds": wall,
        "requests_per_s": len(questions) / wall,
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": quantiles[18],
        "generated_tokens_per_request": sum(g for g, _ in work) / len(work),
        "verifier_tokens_per_request": sum(v for _, v in work) / len(work),
    }


def test_server_under_load(benchmark):
    questions = [p.question for p in load_jsonl(bundled_arithmetic_path(), limit=REQUESTS)]
    searcher = Searcher(verifier="arithmetic", **SETTINGS)
    service = SearchService(searcher).start()
    try:
        with Server(create_app(service, "smollm2-135m")) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
            one = load(client, questions, 1)
            many = benchmark.pedantic(lambda: load(client, questions, 16), rounds=1, iterations=1)
    finally:
        service.stop()
    benchmark.extra_info.update({"settings": SETTINGS, "dtype": str(searcher.policy.dtype), "one_client": one,
                                 "sixteen_clients": many,
                                 "speedup_requests_per_s": many["requests_per_s"] / one["requests_per_s"]})
