"""ttsearch embedded in your code: search one question or many, no dataset, no grading.

    from ttsearch import Searcher

    searcher = Searcher(model="smollm2-135m", verifier="arithmetic", strategy="beam_search", n=16, beam_width=4)
    result = searcher.solve("What is 12 * 7 + 5?")
    result.answer, result.text          # the selected answer and the path that gave it
    result.completions[0].step_scores   # every completion, with its steps and scores
    result.nodes                        # the search tree: every scored step and its parent
    results = searcher.solve_batch(questions, on_step=print)   # all in one batch

A question is a string or chat messages (``[{"role": "user", "content": ...}]``). Settings
are ``SearchConfig``'s (the CLI's flags), given to the Searcher as defaults and per call as
overrides. A question's random stream follows its id (by default the question itself) and
the seed, so in float32 a question gets the same answer alone, in a batch, or from
``ttsearch run`` given the dataset's id.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ttsearch.eval.datasets import Problem
from ttsearch.search.config import ConfigError, SearchConfig
from ttsearch.search.load import load_models
from ttsearch.search.result import Completion, Question, SearchResult, search_result
from ttsearch.search.runner import chat_messages, run_jobs

__all__ = ["Searcher", "SearchResult", "Completion", "StepEvent", "Question", "question_id"]


@dataclass
class StepEvent:
    """A scored step, as it happens: the question's position in the batch and its tree node."""

    index: int
    question: Question
    node: dict


def question_id(question: Question) -> str:
    """A question's default id (its random stream follows it): the question's own text."""
    return question if isinstance(question, str) else json.dumps(question, sort_keys=True, ensure_ascii=False)


class Searcher:
    """A policy, a verifier and default search settings, ready to solve questions.

    ``model`` is an alias, a Hugging Face directory or a .gguf file (or pass ``policy``, an
    Engine); ``verifier`` is "arithmetic", "self", a registered name, a PRM's path, or a
    ``Verifier``; ``settings`` are ``SearchConfig``'s (or pass ``config``, a SearchConfig). ``prefix_caching=False`` gives the
    policy's engine no prefix cache (for measuring what it saves). One search runs at a time on a
    Searcher (calls from several threads wait their turn; ``ttsearch serve`` batches
    concurrent requests instead)."""

    def __init__(self, model: str = "smollm2-135m", verifier="arithmetic", *, verifier_options: dict | None = None,
                 dtype: str | None = None, kv_cache_gib: float | None = None, policy=None, progress: bool = False,
                 prefix_caching: bool = True, weights: str = "auto", config: SearchConfig | None = None,
                 **settings):
        if config is not None and settings:
            raise TypeError("Searcher: give config or settings, not both")
        self.config = config if config is not None else SearchConfig.from_dict(settings, source="Searcher")
        if kv_cache_gib is not None and not (isinstance(kv_cache_gib, (int, float)) and kv_cache_gib > 0):
            raise ConfigError(f"kv_cache_gib={kv_cache_gib!r}: expected a positive size in GiB")
        self.policy, self.verifier = load_models(
            model, verifier, verifier_options=verifier_options, dtype=dtype, weights=weights, policy=policy,
            kv_cache_bytes=int(kv_cache_gib * (1 << 30)) if kv_cache_gib else None, progress=progress,
            prefix_caching=prefix_caching, aggregation=self.config.aggregation)
        self._lock = threading.Lock()

    def settings(self, **overrides) -> SearchConfig:
        """The Searcher's settings with ``overrides``; a bad one raises ConfigError naming it."""
        if not overrides:
            return self.config
        return SearchConfig.from_dict({**self.config.to_dict(), **overrides}, source="search settings")

    def solve(self, question: Question, *, id: str | None = None, on_step: Callable[[StepEvent], None] | None = None,
              **settings) -> SearchResult:
        """Search one question; ``settings`` override the Searcher's for this call."""
        return self.solve_batch([question], ids=None if id is None else [id], on_step=on_step, **settings)[0]

    def solve_batch(self, questions: Sequence[Question], *, ids: Sequence[str] | None = None,
                    on_step: Callable[[StepEvent], None] | None = None, progress: bool = False,
                    **settings) -> list[SearchResult]:
        """Search every question in one batch (as many at once as ``problems_in_flight`` and
        the KV pool allow); results in the questions' order. ``on_step`` sees every scored
        step as it happens."""
        config = self.settings(**settings)
        questions = list(questions)
        ids = [question_id(q) for q in questions] if ids is None else [str(i) for i in ids]
        if len(ids) != len(questions):
            raise ValueError(f"ids: {len(ids)} ids for {len(questions)} questions")
        for i, question in enumerate(questions):
            if not isinstance(question, (str, list)):
                raise TypeError(f"questions[{i}]: expected a str or chat messages, got {type(question).__name__}")
            chat_messages(question, config)  # malformed messages fail before any search starts
        problems = [Problem(id=pid, question=q, answer=None) for pid, q in zip(ids, questions)]
        index_of: dict[str, list[int]] = {}
        for i, pid in enumerate(ids):
            index_of.setdefault(pid, []).append(i)
        results: list[SearchResult | None] = [None] * len(questions)

        def collect(job, record: dict) -> None:
            i = index_of[record["id"]].pop(0)
            results[i] = search_result(job, record)

        step_hook = None
        if on_step is not None:
            position = {id(p): i for i, p in enumerate(problems)}
            step_hook = lambda problem, node: on_step(StepEvent(position[id(problem)], problem.question, dict(node)))  # noqa: E731
        with self._lock:
            run_jobs([(p, config) for p in problems], self.policy, self.verifier, on_job=collect,
                     progress=progress, on_step=step_hook)
        return results
