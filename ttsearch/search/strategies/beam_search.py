"""Beam search over steps, as search-and-learn's."""

from __future__ import annotations

from ttsearch.search.strategies.base import Beam, Lookahead, ids_of


class BeamSearch(Lookahead):
    """n live beams every iteration: each writes one step; a beam completes at EOS, at a
    token limit or on an empty step; of the unfinished ones the best n / M (by aggregate, or
    by their lookahead rollouts) survive and are duplicated to refill n; the last iteration
    writes to EOS. Answers: the n best completions by aggregate (``sort_completed``) or the
    first n. With ``stop_at_n_finished`` (ours) it ends once n paths have finished."""

    source = "search-and-learn"

    def start(self, root: Beam | None = None) -> None:
        self.live = self.start_roots(self.config.n, root=root)
        self._carried: list[Beam] = []  # finished this iteration, recorded once it is decided
        self._duplicates: list[Beam] = []  # released unranked (filter_duplicates), recorded as pruned

    @property
    def answers(self) -> list[Beam]:
        done = self.rank(self.completions) if self.config.sort_completed else self.completions
        return done[: self.config.n]

    def _iterate(self, ended: list[Beam]) -> None:
        c = self.config
        finished, open_ = self.settle(self.live)
        if not open_ or self.iteration >= c.max_iterations or (c.stop_at_n_finished and len(self.completions) >= c.n):
            self.end(finished, open_)
            return
        self._carried, self._duplicates = finished, []
        if c.filter_duplicates:  # of beams with the same text, only the first is ranked
            first: dict[str, Beam] = {}
            for beam in open_:
                first.setdefault(beam.text, beam)
            self._duplicates = [b for b in open_ if first[b.text] is not b]
            for beam in self._duplicates:
                self.release(beam)
            open_ = list(first.values())
        if not self._look_ahead(open_):
            self._decide(open_, [b.aggregate for b in open_])

    def _decide(self, open_: list[Beam], scores: list[float | None]) -> None:
        c = self.config
        ranked = self.rank(open_, scores)
        keep = set(map(id, ranked[: c.n // c.beam_width]))
        pruned = [b for b in ranked if id(b) not in keep]
        for beam in pruned:
            self.release(beam)
        # search-and-learn refills n by repeating the survivors in their order:
        # (survivors * repeats)[:n], so the first n % k of k survivors get one copy more
        survivors = [b for b in open_ if id(b) in keep]
        k = len(survivors)
        forked, children = {}, []
        for i, beam in enumerate(survivors):
            kids = self.fork(beam, c.n // k + (i < c.n % k))
            self.release(beam)
            forked[beam.beam_id] = [kid.beam_id for kid in kids]
            children += kids
        self.trace_iteration(finished=ids_of(self._carried), kept=ids_of(survivors), forked=forked,
                     pruned=ids_of(pruned + self._duplicates))
        self.live = children
