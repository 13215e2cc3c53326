"""REBASE, reward-balanced search (Wu et al. 2024), and its sharing of the width budget."""

from __future__ import annotations

import numpy as np

from ttsearch.search.strategies.base import Beam, Strategy, as_rewards, ids_of, softmax


class Rebase(Strategy):
    """REBASE, reward-balanced search (Wu et al. 2024): a tree whose frontier, the unfinished
    nodes just written, shares a width budget of n minus the paths finished so far in
    proportion to softmax(reward / balance_temperature) of each node's latest step; a node
    given w children forks w times (w = 0: pruned) and every child writes one step. The
    search ends when the budget is spent or nothing is open (the last iteration writes to
    EOS). Answers: the finished paths, at most n."""

    source = "Wu et al. 2024"

    def start(self, root: Beam | None = None) -> None:
        self.live = self.start_roots(self.config.n, root=root)

    def advance(self, ended: list[Beam]) -> None:
        c = self.config
        self.iteration += 1
        finished, open_ = self.settle(self.live)
        budget = c.n - len(self.completions) - len(self.unfinished)
        if budget <= 0 or not open_ or self.iteration >= c.max_iterations:
            self.end(finished, open_)
            return
        widths = share_widths([b.step_scores[-1] for b in open_], budget, c.balance_temperature)
        children, kept, forked, pruned = [], [], {}, []
        for beam, width in zip(open_, widths):
            if width:
                kids = self.fork(beam, width)
                kept.append(beam)
                forked[beam.beam_id] = ids_of(kids)
                children += kids
            else:
                pruned.append(beam)
            self.release(beam)
        self.trace_iteration(finished=ids_of(finished), kept=ids_of(kept), forked=forked, pruned=ids_of(pruned),
                     widths=widths)
        self.live = children




def share_widths(rewards: list[float | None], budget: int, temperature: float) -> list[int]:
    """REBASE's children per node: ``budget`` shared by softmax(reward / temperature), rounded
    so the widths add up to the budget exactly (largest remainders; ties to the earlier node)."""
    share = softmax(as_rewards(rewards) / temperature) * budget
    widths = np.floor(share).astype(int)
    remainders = share - widths
    for i in np.argsort(-remainders, kind="stable")[: budget - int(widths.sum())]:
        widths[i] += 1
    return widths.tolist()
