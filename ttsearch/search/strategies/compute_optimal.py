"""Compute-optimal scaling: a cheap pilot estimates difficulty, a fitted table picks the
strategy and its budget for that difficulty (Snell et al. 2024).

Difficulty is the mean verifier score of the first step of ``pilot_samples`` sampled
paths (higher = easier). Every search records the first-step scores of its initial paths
(``first_step_scores``), so ``fit_table`` can bin the problems of earlier runs on a dev
split by that same estimate and pick, per budget and bin, the strategy that was most
accurate there.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ttsearch.errors import ConfigError
from ttsearch.search.strategies.base import Beam, Strategy, Write

if TYPE_CHECKING:
    from ttsearch.search.config import SearchConfig

TABLE_VERSION = 1


def difficulty(first_step_scores: list[float], samples: int) -> float:
    scores = [s for s in first_step_scores[:samples] if s is not None]
    return float(np.mean(scores)) if scores else 0.0


def bin_of(value: float, edges: list[float]) -> int:
    return int(np.searchsorted(edges, value, side="right"))


def fit_table(records: list[dict], pilot_samples: int = 4, bins: int = 4) -> dict:
    """For every budget present in ``records`` (runs of several strategies over the same
    problems), the best (strategy, selection) per difficulty bin, by accuracy."""
    by_problem: dict[str, list[float]] = {}
    for r in records:
        if r.get("first_step_scores"):
            by_problem.setdefault(r["id"], r["first_step_scores"])
    if not by_problem:
        raise ValueError("no record has first_step_scores: fit needs runs made by `ttsearch run`")
    level = {pid: difficulty(s, pilot_samples) for pid, s in by_problem.items()}
    edges = sorted(set(np.quantile(list(level.values()), np.linspace(0, 1, bins + 1)[1:-1]).tolist()))

    # accuracy[budget][bin][(strategy, beam_width, selection)] -> [correct, total]
    accuracy = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: [0, 0])))
    for r in records:
        if r["id"] not in level or r["strategy"] == "compute_optimal":
            continue
        b = bin_of(level[r["id"]], edges)
        for selection, per_budget in r["selections"].items():
            for budget, outcome in per_budget.items():
                # best-of-N at a smaller N comes from the same run; tree searches only at their own n
                if r["strategy"] != "best_of_n" and int(budget) != r["n"]:
                    continue
                cell = accuracy[int(budget)][b][(r["strategy"], r["beam_width"], selection)]
                cell[0] += bool(outcome["correct"])
                cell[1] += 1
    table = {"version": TABLE_VERSION, "pilot_samples": pilot_samples, "edges": edges, "budgets": {}}
    for budget, per_bin in sorted(accuracy.items()):
        choices = []
        for b in range(len(edges) + 1):
            cells = per_bin.get(b) or {k: v for bb in per_bin.values() for k, v in bb.items()}
            (strategy, width, selection), (hit, total) = max(cells.items(), key=lambda kv: kv[1][0] / kv[1][1])
            choices.append({"strategy": strategy, "n": budget, "beam_width": width, "selection": selection,
                            "accuracy": hit / total, "problems": total})
        table["budgets"][str(budget)] = choices
    return table


def read_table(path: str | Path) -> dict:
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"optimal_table={str(path)!r}: cannot read it ({exc})") from exc
    if table.get("version") != TABLE_VERSION or "budgets" not in table or "edges" not in table:
        raise ConfigError(f"optimal_table={str(path)!r}: not a table written by `ttsearch fit`")
    return table


def choose(table: dict, budget: int, level: float) -> dict:
    """The table's choice for the largest fitted budget not above ``budget``."""
    fitted = sorted(int(b) for b in table["budgets"])
    usable = [b for b in fitted if b <= budget] or fitted[:1]
    return table["budgets"][str(usable[-1])][bin_of(level, table["edges"])]


class ComputeOptimal(Strategy):
    """Pilot first: ``pilot_samples`` paths write and score one step. Then the fitted
    table's strategy runs with the budget ``n``; this object delegates to it. ``table``: the
    fitted table (default: read from ``optimal_table``)."""

    source = "search-and-learn"

    def __init__(self, policy, verifier, config: SearchConfig, prompt_ids, question, table: dict | None = None,
                 seed: int = 0):
        super().__init__(policy, verifier, config, prompt_ids, question, seed=seed)
        self.table = table if table is not None else read_table(config.optimal_table)
        self.inner: Strategy | None = None
        self.choice: dict | None = None
        self.pilot_level: float | None = None
        self.prompt: Beam | None = None  # kept through the pilot: the chosen search forks from it

    @classmethod
    def check(cls, config: SearchConfig) -> None:
        super().check(config)
        if not config.optimal_table:
            raise ConfigError(f"optimal_table={config.optimal_table!r}: compute_optimal needs the table written by "
                              "`ttsearch fit`")
        if not Path(config.optimal_table).is_file():
            raise ConfigError(f"optimal_table={config.optimal_table!r}: no such file")
        read_table(config.optimal_table)

    @property
    def first_beams(self) -> int:
        return self.config.pilot_samples  # the pilot's

    @property
    def peak_beams(self) -> int:
        return max(self.config.n, self.config.pilot_samples)

    def record_fields(self) -> dict:
        return {"pilot_level": self.pilot_level, "choice": self.choice}

    @property
    def waits_for_all(self) -> bool:
        return self.inner is None or self.inner.waits_for_all

    @property
    def answers(self):
        return self.inner.answers if self.inner is not None else []

    def held(self):
        return self.inner.held() if self.inner is not None else self.live + [self.prompt]

    def write_for(self, beam):
        if self.inner is None:
            return Write(self.config.stop, self.config.step_tokens)
        return self.inner.write_for(beam)

    def start(self, root=None) -> None:
        self.prompt = root or self.prompt_beam()
        self.live = self.start_roots(self.config.pilot_samples, root=self.prompt)

    def advance(self, ended) -> None:
        if self.inner is None:
            self.pilot_level = difficulty([b.step_scores[0] for b in self.live], self.config.pilot_samples)
            for beam in self.live:
                self.release(beam)
            self.choice = choose(self.table, self.config.n, self.pilot_level)
            inner_config = replace(
                self.config, strategy=self.choice["strategy"], n=self.choice["n"], beam_width=self.choice["beam_width"]
            )
            from ttsearch.search.strategies import SEARCHES  # the registry holds this class too

            self.inner = SEARCHES[inner_config.strategy](
                self.policy, self.verifier, inner_config, self.prompt_ids, self.question, seed=self.seed
            )
            self.inner.start(root=self.prompt)  # forks only: nothing to allocate mid-search
            self.release(self.prompt)
            self.prompt = None
        else:
            self.inner.advance(ended)
        self._follow_inner()

    def stop_early(self, reason: str) -> None:
        self.inner.stop_early(reason)  # answers exist only once the chosen search runs
        self.early_stop = self.inner.early_stop
        self._follow_inner()

    def abort(self) -> None:
        if self.inner is None:
            super().abort()  # the pilot's paths and the prompt
            self.prompt = None
        else:
            self.inner.abort()
            self._follow_inner()

    def _follow_inner(self) -> None:
        self.live = self.inner.live
        self.completions = self.inner.completions
        self.unfinished = self.inner.unfinished
        self.trace = self.inner.trace
        self.iteration = self.inner.iteration
