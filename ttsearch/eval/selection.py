"""Choosing one answer from a problem's finished paths, at every budget N from the same run.

At budget N the candidates are the first N finished paths (in the order they finished):
for best-of-N that is exactly best-of-N at N; for tree searches it is the share of the
run's answers that N paths would have produced first.
"""

from __future__ import annotations

from collections import defaultdict

SELECTIONS = ("naive", "majority", "weighted")


def budgets(n: int) -> list[int]:
    """1, 2, 4, ... up to n (and n itself)."""
    out, b = [], 1
    while b < n:
        out.append(b)
        b *= 2
    return out + [n]


def select(candidates: list[tuple[str | None, float | None]], method: str, key=lambda a: a) -> str | None:
    """The chosen answer among ``(answer, score)`` pairs; ``key`` groups equivalent answers.

    naive: the answer of the best-scored path; majority: the most frequent answer;
    weighted: the answer with the largest summed score. Paths without an extractable
    answer take part only when no path has one. Ties go to the earliest path."""
    if method not in SELECTIONS:
        raise ValueError(f"selection {method!r}: expected one of {SELECTIONS}")
    with_answer = [(a, s) for a, s in candidates if a is not None]
    if not with_answer:
        return None
    if method == "naive":
        best = max(range(len(with_answer)), key=lambda i: (_score(with_answer[i][1]), -i))
        return with_answer[best][0]
    totals: dict[str, float] = defaultdict(float)
    first: dict[str, int] = {}
    representative: dict[str, str] = {}
    for i, (answer, score) in enumerate(with_answer):
        k = key(answer)
        totals[k] += 1.0 if method == "majority" else max(_score(score), 0.0)
        first.setdefault(k, i)
        representative.setdefault(k, answer)
    winner = max(totals, key=lambda k: (totals[k], -first[k]))
    return representative[winner]


def chosen_index(candidates: list[tuple[str | None, float | None]], method: str = "naive", key=lambda a: a) -> int | None:
    """The index of the candidate that stands for ``select``'s answer: the best-scored path with
    that answer (ties: the earliest); the best-scored path of all when none has an answer;
    None without candidates."""
    if not candidates:
        return None
    answer = select(candidates, method, key=key)
    pool = range(len(candidates)) if answer is None else [
        i for i, (a, _) in enumerate(candidates) if a is not None and key(a) == key(answer)]
    return max(pool, key=lambda i: (_score(candidates[i][1]), -i))


def _score(score: float | None) -> float:
    return float("-inf") if score is None else score
