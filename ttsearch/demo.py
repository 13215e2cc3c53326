"""The embedded demo: SmolLM2-135M searching the bundled arithmetic problems with the
arithmetic checker as its verifier, on a CPU, in a few minutes.

It runs best-of-N (which also gives the one-sample baseline), beam search and DVTS with the
same budget, prints each one's accuracy as soon as it finishes and a table of all of them at
the end (the verifier's best-scored answer, majority vote and weighted best-of-N), and writes
the plot. Results go to JSONL files in ``output_dir``; rerunning resumes and skips finished
problems.
"""

from __future__ import annotations

import time
from pathlib import Path

DEMO_PROBLEMS = 32
DEMO_N = 16

# One calculation per step, so the arithmetic checker judges each step on its own; a worked
# example teaches a 135M model that format. A path is as good as its worst step ("min"): one
# false equation sinks it. Short steps (the last iteration and a best-of-N sample capped at
# six of them), and every problem in one batch, keep the whole demo within a few minutes on
# 2 CPU cores.
DEMO_SETTINGS = dict(
    max_iterations=6,
    max_tokens=240,
    aggregation="min",
    max_step_tokens=40,
    temperature=0.8,
    top_p=0.95,
    problems_in_flight=32,
    system_prompt=(
        "Solve the math problem step by step. Write one calculation per step, separate the steps "
        "with a blank line, and end with: The answer is \\boxed{ANSWER}."
    ),
    example_question="What is 12 * 7 + 5?",
    example_solution="12 * 7 = 84\n\n84 + 5 = 89\n\nThe answer is \\boxed{89}.",
)


def run_demo(output_dir: str | Path = "runs/demo", limit: int | None = None, n: int | None = None,
             weights: str = "auto") -> int:
    from ttsearch.engine.engine import Engine
    from ttsearch.eval.report import accuracy_rows, plot_accuracy
    from ttsearch.search import run
    from ttsearch.search.config import SearchConfig
    from ttsearch.search.results import read_results

    output_dir = Path(output_dir)
    limit = limit or DEMO_PROBLEMS
    n = n or DEMO_N
    configs = {
        "best_of_n": SearchConfig(strategy="best_of_n", n=n, **DEMO_SETTINGS),
        "beam_search": SearchConfig(strategy="beam_search", n=n, beam_width=4 if n % 4 == 0 else 1, **DEMO_SETTINGS),
        "dvts": SearchConfig(strategy="dvts", n=n, beam_width=4 if n % 4 == 0 else 1, **DEMO_SETTINGS),
    }
    start = time.perf_counter()
    policy = Engine("smollm2-135m", kv_cache_bytes=3 << 29, weights=weights)
    print(f"SmolLM2-135M ({policy.dtype}, {policy.weights} weights) + arithmetic checker, {limit} bundled problems, "
          f"N up to {n}")
    records = []
    labels = {"best_of_n": "best-of-N", "beam_search": "beam search", "dvts": "DVTS"}
    for name, config in configs.items():
        path = output_dir / f"{name}.jsonl"
        run(config, path, verifier="arithmetic", limit=limit, policy=policy)
        records += read_results(path)
        # each strategy's accuracy as soon as it is known; the table below sums them up
        done = {(r["selection"], r["N"]): r["accuracy"] for r in accuracy_rows(read_results(path))}
        first = f"one sample {done[('naive', 1)]:.3f}; " if name == "best_of_n" else ""
        print(f"[{time.perf_counter() - start:4.0f} s] {labels[name]}: {first}N={n} best score "
              f"{done[('naive', n)]:.3f}, majority {done[('majority', n)]:.3f}, weighted {done[('weighted', n)]:.3f}",
              flush=True)

    rows = {(r["run"].split()[0], r["selection"], r["N"]): r["accuracy"] for r in accuracy_rows(records)}
    sampled = [r for r in records if r["strategy"] == "best_of_n"]
    samples = sum(r["n"] for r in sampled)  # a sample that never finished counts as wrong
    correct = sum(c["correct"] for r in sampled for c in r["completions"])
    print(f"\naccuracy on {limit} problems ({time.perf_counter() - start:.0f} s)")
    print(f"  one sample (N=1): {rows[('best_of_n', 'naive', 1)]:.3f}; "
          f"mean over all {samples} best-of-N samples: {correct / max(samples, 1):.3f}")
    print(f"  N={n:<14} {'best score':>10} {'majority':>9} {'weighted':>9}")
    for strategy, label in labels.items():
        cells = "".join(f" {rows[(strategy, selection, n)]:>9.3f}" for selection in ("naive", "majority", "weighted"))
        print(f"  {label:<16} {cells[1:]:>29}")
    plot = plot_accuracy(records, output_dir / "accuracy.png", title="SmolLM2-135M + arithmetic checker")
    print(f"\nplot: {plot}\nfull table: ttsearch eval {output_dir}/*.jsonl")
    return 0
