"""Search strategies and the research workflow's Python API (the CLI calls these)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ttsearch.eval.selection import SELECTIONS, budgets, select
from ttsearch.search.config import STRATEGIES, ConfigError, SearchConfig
from ttsearch.search.results import ResultsWriter, read_results

#: settings that change how fast a run goes, never what it writes
NOT_SETTINGS = ("n", "problems_in_flight")


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
    weights: str = "auto",
    kv_cache_bytes: int | None = None,
    policy=None,
    progress: bool = True,
    ns: list[int] | None = None,
    start: int | None = None,
    end: int | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    imports: list[str] | None = None,
    worker_threads: int | None = None,
):
    """Search every problem of ``dataset`` (default: the bundled arithmetic set) and append
    one JSON line per problem and budget to ``output``.

    ``ns`` runs one search per budget n (default: ``config.n``) on one engine, all in one
    batch; a beam search at a smaller n is its own search, not a prefix of a larger one.
    ``start``/``end`` take a slice of the dataset and ``limit`` its first problems (in that
    order, as search-and-learn's dataset_start, dataset_end and num_samples). Searches
    already in ``output`` are skipped, so rerunning after an interrupt resumes; a file
    written with other settings is an error naming them. The dataset is read, and the
    settings checked, before any model loads. ``verifier`` is a spec for ``load_verifier``
    ("arithmetic", "self", a PRM's path; ``verifier_options`` go with it) or a Verifier.
    Pass ``policy`` to reuse an Engine across runs. Returns the scheduler's statistics
    (decode batch occupancy, scoring time, preemptions).

    ``workers`` (a local Ray instance with that many worker actors) or ``ray_address`` (an
    existing Ray cluster) spread the problems over workers that each load ``model`` and
    ``verifier`` themselves (``imports``: modules they import first, e.g. ones that register
    strategies; ``worker_threads``: each one's CPU threads); the file is written here as
    their records arrive. Returns then the workers started and lost, the problems requeued
    and the driver's seconds per record."""
    from ttsearch.eval.arithmetic import bundled_arithmetic_path
    from ttsearch.eval.datasets import load_jsonl

    from ttsearch.search.distributed import check_workers

    budgets_to_run = _budgets(config, ns)
    distributed = workers is not None or ray_address is not None
    check_workers(workers, ray_address, worker_threads)
    if distributed and (policy is not None or not isinstance(verifier, str)):
        raise ConfigError("workers load their own model and verifier: give their names, not an Engine or a Verifier")
    from ttsearch.verifiers.load import REGISTERED

    if isinstance(verifier, str) and verifier not in ("arithmetic", "self", *REGISTERED):
        from ttsearch.models.loader import resolve_model_path

        resolve_model_path(verifier)  # a PRM path that does not exist fails before any model loads
    problems = load_jsonl(dataset or bundled_arithmetic_path(), fields=fields)
    if start is not None or end is not None:
        problems = problems[start:end]
    if limit is not None:
        problems = problems[:limit]
    settings = run_settings(config, model if policy is None else policy, verifier, verifier_options, dtype, weights)
    with ResultsWriter(output, settings) as writer:
        todo = [(p, replace(config, n=n)) for n in budgets_to_run for p in problems if (p.id, n) not in writer.done]
        if not todo:
            return None
        load_args = dict(model=model, verifier=verifier, verifier_options=verifier_options, dtype=dtype,
                         weights=weights, kv_cache_bytes=kv_cache_bytes, aggregation=config.aggregation)
        if distributed:
            from ttsearch.search.distributed import run_on_workers

            return run_on_workers(todo, writer.write, settings, load_args, workers=workers, ray_address=ray_address,
                                  imports=imports, progress=progress, threads=worker_threads)
        from ttsearch.search.load import load_models
        from ttsearch.search.runner import run_jobs

        policy, verifier = load_models(**load_args, policy=policy, progress=progress)
        return run_jobs(todo, policy, verifier, on_record=writer.write, settings=settings, progress=progress)


def _budgets(config: SearchConfig, ns: list[int] | None) -> list[int]:
    if ns is None:
        return [config.n]
    if not ns:
        raise ConfigError("n: give at least one budget")
    for n in ns:
        replace(config, n=n)  # each budget is checked like a setting (e.g. a multiple of beam_width)
    if len(set(ns)) != len(ns):
        raise ConfigError(f"n={','.join(map(str, ns))}: a budget appears twice")
    return list(ns)


def run_settings(config: SearchConfig, model, verifier, verifier_options: dict | None, dtype: str | None,
                 weights: str = "auto") -> dict:
    """What a run's records depend on: the search settings (but the budget n and the batch
    size), the model (and whether its GGUF weights ran packed or dequantized), the verifier and
    the dtype. Stored in every record and checked on resume."""
    from ttsearch.engine.engine import resolve_dtype, resolve_weights

    settings = {k: v for k, v in config.to_dict().items() if k not in NOT_SETTINGS}
    if isinstance(model, str):
        import torch

        cpu = torch.device("cpu")
        model_name, model_dtype, weights = model, resolve_dtype(dtype, cpu), resolve_weights(weights, cpu)
    else:
        model_name, model_dtype, weights = model.name, model.dtype, model.weights
    verifier_name = verifier if isinstance(verifier, str) else type(verifier).__name__
    return {**settings, "model": model_name, "dtype": str(model_dtype).removeprefix("torch."), "weights": weights,
            "verifier": verifier_name, "verifier_options": verifier_options or {}}


__all__ = ["run", "run_settings", "SearchConfig", "ConfigError", "STRATEGIES", "SELECTIONS", "budgets", "select",
           "read_results"]
