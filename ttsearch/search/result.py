"""A finished search as its caller sees it (``Searcher``, the server): the paths it answers
with, the answer each selection chooses at its budget n, and the chosen path."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ttsearch.eval.grading import answer_key, extract_answer
from ttsearch.eval.selection import SELECTIONS, chosen_index, select

Question = str | list[dict]


@dataclass
class Completion:
    """One finished path: its text, steps and their scores, and the answer in it."""

    text: str
    steps: list[str]
    step_scores: list[float | None]
    aggregate: float | None
    finish: str | None  # "eos", "length" or "empty"
    answer: str | None
    node: int | None = None  # its last step's node in the tree


@dataclass
class SearchResult:
    question: Question
    answer: str | None  # chosen by the verifier's best score (naive selection)
    text: str | None  # the chosen path's text
    chosen: int | None  # the chosen path's index in completions
    selections: dict[str, str | None]  # the answer by each selection: naive, majority, weighted
    completions: list[Completion]
    prompt_tokens: int
    tokens_generated: int
    tokens_verified: int
    seconds: float
    iterations: int
    nodes: list[dict] = field(default_factory=list)  # the tree: {"id", "parent", "score", "tokens", "text"}
    early_stop: dict | None = None
    record: dict = field(default_factory=dict, repr=False)  # the record `ttsearch run` would write
    strategy: str = ""
    n: int = 0


def search_result(job, record: dict | None = None) -> SearchResult:
    """The result of a finished scheduler job (``record``, if given, is its record)."""
    search, config = job.search, job.search.config
    completions = [Completion(b.text, list(b.steps), b.step_scores, b.aggregate, b.finish, extract_answer(b.text),
                              b.node) for b in search.answers]
    candidates = [(c.answer, c.aggregate) for c in completions]
    chosen = chosen_index(candidates, "naive", key=answer_key)
    selections = {method: select(candidates[: config.n], method, key=answer_key) for method in SELECTIONS}
    seconds = record["seconds"] if record is not None else round(time.perf_counter() - job.started, 3)
    return SearchResult(
        question=job.problem.question,
        answer=selections["naive"],
        text=completions[chosen].text if chosen is not None else None,
        chosen=chosen,
        selections=selections,
        completions=completions,
        prompt_tokens=len(search.prompt_ids),
        tokens_generated=job.tokens_generated,
        tokens_verified=job.tokens_verified,
        seconds=seconds,
        iterations=search.iteration,
        nodes=search.nodes,
        early_stop=search.early_stop,
        record=record if record is not None else {},
        strategy=config.strategy,
        n=config.n,
    )
