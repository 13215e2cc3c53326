"""Every strategy at one budget on the bundled arithmetic set, with and without early stopping:
accuracy and tokens per problem in one table (the README's), and the plot of accuracy
against N and against tokens.

    .venv/bin/python benchmarks/compare_strategies.py [--limit 32] [--n 16] [--output-dir DIR]

SmolLM2-135M and the arithmetic checker with the demo's settings (its prompt, step limits and
aggregation), one engine for every run. Results go to DIR/<strategy>[-stop].jsonl as they
finish (rerunning resumes), the table to stdout and DIR/table.md, the plot to DIR/accuracy.png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ttsearch.demo import DEMO_SETTINGS
from ttsearch.engine.engine import Engine
from ttsearch.eval.arithmetic import bundled_arithmetic_path
from ttsearch.eval.datasets import load_jsonl
from ttsearch.eval.report import accuracy_rows, early_stop_rows, format_early_stop_rows, plot_accuracy, run_label
from ttsearch.search import run
from ttsearch.search.config import SearchConfig
from ttsearch.search.results import read_results

STRATEGIES = ("best_of_n", "beam_search", "dvts", "particle_filter", "rebase")
EARLY_STOP = dict(stop_agree=3, stop_window=4)  # three of the last four finished answers agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--output-dir", default="benchmarks/results/strategies")
    args = parser.parse_args()
    out = Path(args.output_dir)
    policy = Engine("smollm2-135m", kv_cache_bytes=3 << 29)
    ids = {p.id for p in load_jsonl(bundled_arithmetic_path(), limit=args.limit)}  # a file may hold more
    records = []
    for strategy in STRATEGIES:
        for stop in (False, True):
            config = SearchConfig(strategy=strategy, n=args.n, beam_width=4, **DEMO_SETTINGS, **(EARLY_STOP if stop else {}))
            path = out / f"{strategy}{'-stop' if stop else ''}.jsonl"
            start = time.perf_counter()
            run(config, path, verifier="arithmetic", limit=args.limit, policy=policy)
            print(f"{path}: {time.perf_counter() - start:.0f} s", flush=True)
            records += [r for r in read_results(path) if r["id"] in ids]

    table = markdown_table(records, args.n)
    stops = format_early_stop_rows(early_stop_rows(records))
    print(f"\n{table}\n\n{stops}")
    (out / "table.md").write_text(f"{table}\n\n```\n{stops}\n```\n")
    plot = plot_accuracy(records, out / "accuracy.png", title=f"SmolLM2-135M + arithmetic checker, {args.limit} problems")
    print(f"\nplot: {plot}")


def markdown_table(records: list[dict], n: int) -> str:
    """One row per run at N = n: accuracy by each selection and tokens per problem."""
    rows = [r for r in accuracy_rows(records) if r["N"] == n]
    runs = sorted({r["run"] for r in rows}, key=lambda label: [run_label(rec) for rec in records].index(label))
    cell = {(r["run"], r["selection"]): r for r in rows}
    lines = [f"| strategy (N={n}) | best score | majority | weighted | tokens/problem (generated + verified) |",
             "|---|---|---|---|---|"]
    for label in runs:
        accuracy = " | ".join(f"{cell[label, s]['accuracy']:.3f}" for s in ("naive", "majority", "weighted"))
        lines.append(f"| {label} | {accuracy} | {cell[label, 'naive']['tokens_per_problem']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
