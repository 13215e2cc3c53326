"""Search strategies and the research workflow's Python API (the CLI calls these)."""

from __future__ import annotations

from pathlib import Path

from ttsearch.search.config import STRATEGIES, ConfigError, SearchConfig
from ttsearch.search.results import ResultsWriter, read_results
from ttsearch.search.selection import SELECTIONS, budgets, select


def run(
    config: SearchConfig,
    output: str | Path,
    model: str = "smollm2-135m",
    verifier="arithmetic",
    verifier_options: dict | None = None,
    dataset: str | Path | None = None,
    limit: int | None = None,
    fields: dict | None = None,
    dtype: str | None = None,
    kv_cache_bytes: int | None = None,
    policy=None,
    progress: bool = True,
) -> Path:
    """Search every problem of ``dataset`` (default: the bundled arithmetic set) and append
    one JSON line per problem to ``output``. Problems already in ``output`` are skipped, so
    rerunning after an interrupt resumes. The dataset is read, and the config checked,
    before any model loads. ``verifier`` is a spec for ``load_verifier`` ("arithmetic",
    "self", a PRM's path; ``verifier_options`` go with it) or a Verifier. Pass ``policy``
    to reuse an Engine across runs."""
    from ttsearch.eval.arithmetic import bundled_arithmetic_path
    from ttsearch.eval.datasets import load_jsonl

    if isinstance(verifier, str) and verifier not in ("arithmetic", "self"):
        from ttsearch.models.loader import resolve_model_path

        resolve_model_path(verifier)  # a PRM path that does not exist fails before any model loads
    problems = load_jsonl(dataset or bundled_arithmetic_path(), fields=fields, limit=limit)
    if config.strategy == "compute_optimal":
        from ttsearch.search.compute_optimal import read_table

        read_table(config.optimal_table)
    with ResultsWriter(output) as writer:
        todo = [p for p in problems if p.id not in writer.done_ids]
        if not todo:
            return Path(output)
        if policy is None:
            from ttsearch.engine.engine import DEFAULT_KV_CACHE_BYTES, Engine

            policy = Engine(model, dtype=dtype, kv_cache_bytes=kv_cache_bytes or DEFAULT_KV_CACHE_BYTES, progress=progress)
        from ttsearch.search.runner import run_jobs
        from ttsearch.verifiers import Verifier, load_verifier

        if isinstance(verifier, Verifier):
            scorer = verifier
        else:
            options = dict(verifier_options or {})
            scorer = load_verifier(verifier, policy_engine=policy, aggregation=config.aggregation, **options)
        run_jobs(todo, policy, scorer, config, on_record=writer.write, progress=progress)
    return Path(output)


__all__ = ["run", "SearchConfig", "ConfigError", "STRATEGIES", "SELECTIONS", "budgets", "select", "read_results"]
