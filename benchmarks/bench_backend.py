"""its_hub's particle filtering driven through `ttsearch serve`, against our own particle_filter.

The same problems (the first bundled arithmetic ones), prompt (the system prompt and the
question as the user's turn), model (SmolLM2-135M, the machine's default dtype), verifier
(SmolLM2 as a Math-Shepherd-format PRM on the policy's engine, as in bench_search.py) and
settings (its_hub's step-by-step system prompt, steps to a blank line of at most STEP_TOKENS
tokens, at most MAX_STEPS steps, temperature 0.8, multinomial resampling on the PRM's
log-odds), at budgets 8 and 16:

- (a) its_hub 1.2's ``ParticleFiltering`` with ``OpenAICompatibleLanguageModel`` pointed at a
  ``ttsearch serve`` subprocess on loopback, and ``ttsearch.integrations.its_hub.ScoreStepsPRM``
  as its PRM (the same server's ``/v1/score_steps``). its_hub runs one problem at a time; each
  step of each particle is one request;
- (b) the same against a server started with ``--no-prefix-caching``: every request prefills
  its whole path, as a server without a prefix cache does (the PRM too: it re-reads each path);
- (c) our ``particle_filter`` strategy in process, one problem in flight (as (a) runs them), and
  every problem in flight (how ttsearch runs a dataset).

Reported for each, per problem: seconds, generated tokens, prefilled tokens (prompt tokens the
policy forwarded: every token forwarded less the generated and the verifier's), verifier tokens
(tokens the PRM forwarded), and requests (generation and scoring). The two sides stop particles
by their own rules (its_hub at ``\\boxed`` or MAX_STEPS, ours at EOS or MAX_STEPS), so their
generated tokens differ: compare seconds per generated token beside seconds per problem.

    python -m pytest benchmarks/bench_backend.py --benchmark-only \\
        --benchmark-json benchmarks/results/backend_cpu_<machine>.json

``BENCH_WEIGHTS`` (auto, packed or dequantized; default auto, the engine's default) picks the
GGUF file's weights on every side (``--weights`` on both servers, ``weights=`` in process).
``BENCH_MAX_STEPS`` (default 4) sets MAX_STEPS: longer paths cost a server without reuse
quadratically more prefill.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_serve import free_port  # noqa: E402  (the tests' loopback port)

from ttsearch.eval.arithmetic import bundled_arithmetic_path  # noqa: E402
from ttsearch.eval.datasets import load_jsonl  # noqa: E402
from ttsearch.search import SearchConfig  # noqa: E402
from ttsearch.search.runner import run_jobs  # noqa: E402
from ttsearch.verifiers import load_verifier  # noqa: E402

try:  # the system prompt its_hub ships for step-by-step search (search-and-learn's)
    from its_hub.core.utils import SAL_STEP_BY_STEP_SYSTEM_PROMPT as SYSTEM_PROMPT
except ImportError:  # pragma: no cover - its_hub is in the test group
    SYSTEM_PROMPT = None

PROBLEMS = 3
STEP = "\n\n"
MAX_STEPS = int(os.environ.get("BENCH_MAX_STEPS", 4))
STEP_TOKENS = 128  # room for a step to end at its blank line: a step cut short ends our path, not its_hub's
TEMPERATURE = 0.8
PRM_OPTIONS = {"family": "math-shepherd", "tag": "ки"}
MODEL = "smollm2-135m"
# the model's weights on every side: dequantized to the dtype at load, or packed (GGUF's blocks)
WEIGHTS = os.environ.get("BENCH_WEIGHTS", "auto")


def problems():
    return load_jsonl(bundled_arithmetic_path(), limit=PROBLEMS)


class ServerProcess:
    """``ttsearch serve`` in a subprocess on a free loopback port."""

    def __init__(self, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "ttsearch", "--log-level", "warning", "serve", "--port", str(self.port),
                   "--verifier", MODEL, "--verifier-options", json.dumps(PRM_OPTIONS), "--weights", WEIGHTS, *flags]
        self.process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.time() + 300
        while True:
            assert self.process.poll() is None and time.time() < deadline, "the server did not start"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        # warm up (kernels chosen and packed on first use), outside the measured runs
        body = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 8, "n": 4}
        httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=300).raise_for_status()
        body = {"question": "What is 2 + 2?", "paths": [["2 + 2 = 4\n\n"]]}
        httpx.post(f"{self.url}/v1/score_steps", json=body, timeout=300).raise_for_status()

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def servers():
    reuse, no_reuse = ServerProcess(), ServerProcess("--no-prefix-caching")
    yield {"reuse": reuse, "no_reuse": no_reuse}
    reuse.stop()
    no_reuse.stop()


def its_hub_particle_filtering(server: ServerProcess, budget: int) -> dict:
    from its_hub import OpenAICompatibleLanguageModel, StepGeneration
    from its_hub.core.algorithms.particle_gibbs import ParticleFiltering

    from ttsearch.integrations.its_hub import ScoreStepsPRM

    lm = OpenAICompatibleLanguageModel(endpoint=f"{server.url}/v1", api_key="unused", model_name=MODEL,
                                       system_prompt=SYSTEM_PROMPT, max_completion_tokens=STEP_TOKENS,
                                       temperature=TEMPERATURE)
    steps = StepGeneration(step_token=STEP, max_steps=MAX_STEPS, stop_token="\\boxed", temperature=TEMPERATURE)
    filtering = ParticleFiltering(steps, ScoreStepsPRM(f"{server.url}/v1", model=MODEL, step_token=STEP))
    before = server.health()
    start = time.perf_counter()
    for problem in problems():
        filtering.infer(lm, problem.question, budget=budget)
    seconds = time.perf_counter() - start
    after = server.health()
    totals = {k: after["totals"].get(k, 0) - before["totals"].get(k, 0) for k in after["totals"]}
    forwarded = after["tokens_forwarded"] - before["tokens_forwarded"]
    return per_problem(seconds, totals["generated_tokens"], forwarded, totals["verifier_tokens"],
                       requests=totals["generation_requests"] + totals["score_requests"],
                       cached_prompt_tokens=totals["cached_tokens"], prompt_tokens=totals["prompt_tokens"],
                       steps_remembered=totals.get("steps_remembered", 0), steps_scored=totals["steps_scored"])


_engine = None


def engine():
    global _engine
    if _engine is None:
        from ttsearch import Engine

        _engine = Engine(MODEL, weights=WEIGHTS, progress=False)
        seq = _engine.add(_engine.tokenizer.encode("What is 2 + 2?"))  # warm up, outside the measured runs
        forks = _engine.fork(seq, 4)
        _engine.generate_step(forks, max_tokens=8)
        for s in [seq, *forks]:
            _engine.free(s)
    return _engine


def ours(budget: int, in_flight: int) -> dict:
    policy = engine()
    prm = load_verifier(MODEL, policy_engine=policy, **PRM_OPTIONS)
    config = SearchConfig(strategy="particle_filter", n=budget, max_iterations=MAX_STEPS, max_step_tokens=STEP_TOKENS,
                          max_tokens=STEP_TOKENS, stop=STEP, temperature=TEMPERATURE, system_prompt=SYSTEM_PROMPT,
                          problems_in_flight=in_flight)
    records: list[dict] = []
    forwarded = policy.tokens_forwarded
    start = time.perf_counter()
    run_jobs([(p, config) for p in problems()], policy, prm, on_record=records.append, progress=False)
    seconds = time.perf_counter() - start
    generated = sum(r["tokens_generated"] for r in records)
    verified = sum(r["tokens_verified"] for r in records)
    return per_problem(seconds, generated, policy.tokens_forwarded - forwarded, verified, requests=0,
                       problems_in_flight=in_flight)


def per_problem(seconds: float, generated: int, forwarded: int, verified: int, requests: int, **extra) -> dict:
    n = PROBLEMS
    return {"seconds_per_problem": seconds / n, "generated_tokens_per_problem": generated / n,
            "prefilled_tokens_per_problem": (forwarded - generated - verified) / n,
            "verifier_tokens_per_problem": verified / n, "requests_per_problem": requests / n,
            "seconds_per_generated_token": seconds / max(generated, 1),
            **{k: v / n if isinstance(v, int) and k != "problems_in_flight" else v for k, v in extra.items()}}


@pytest.mark.parametrize("budget", [8, 16])
def test_its_hub_particle_filtering(benchmark, servers, budget):
    load_before = os.getloadavg()[0]  # other work on the machine makes every figure slower, and unevenly
    reuse = benchmark.pedantic(its_hub_particle_filtering, args=(servers["reuse"], budget), rounds=1, iterations=1)
    no_reuse = its_hub_particle_filtering(servers["no_reuse"], budget)
    alone, together = ours(budget, 1), ours(budget, PROBLEMS)
    benchmark.extra_info.update({
        "problems": PROBLEMS, "budget": budget, "max_steps": MAX_STEPS, "step_tokens": STEP_TOKENS,
        "dtype": str(engine().dtype), "weights": engine().weights,
        "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
        "a_its_hub_through_server_with_reuse": reuse,
        "b_its_hub_through_server_without_reuse": no_reuse,
        "c_ours_in_process_one_in_flight": alone,
        "c_ours_in_process_all_in_flight": together,
        "a_over_b_speedup": no_reuse["seconds_per_problem"] / reuse["seconds_per_problem"],
        "c_over_a_speedup": reuse["seconds_per_problem"] / alone["seconds_per_problem"],
        "c_over_a_speedup_per_generated_token":
            reuse["seconds_per_generated_token"] / alone["seconds_per_generated_token"],
    })
