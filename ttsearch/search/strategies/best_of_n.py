"""Best-of-N: n independent samples, selected afterwards."""

from __future__ import annotations

from ttsearch.search.strategies.base import Beam, Strategy, Write, ids_of


class BestOfN(Strategy):
    """n independent samples, each written to EOS within ``max_tokens`` and scored at every
    step; selection happens afterwards. Samples advance on their own: a sample whose step
    ended is scored and goes on without waiting for the others."""

    waits_for_all = False
    source = "search-and-learn"
    selects_every_budget = True

    def start(self, root: Beam | None = None) -> None:
        self.live = self.start_roots(self.config.n, root=root)

    def write_for(self, beam: Beam) -> Write:
        c = self.config
        return Write(c.stop, min(c.step_tokens, c.max_tokens - beam.tokens))

    def advance(self, ended: list[Beam]) -> None:
        for beam in ended:
            # a step limit only divides a sample into scored steps; the sample's own limits
            # are max_tokens and the context length
            room = beam.tokens < self.config.max_tokens and len(beam.seq) < self.policy.max_model_len
            if beam.finish == "length" and room:
                beam.finish = None
            elif beam.finish is None and not room:
                beam.finish = "length"
        finished, _ = self.settle(ended)
        gone = set(map(id, finished))
        self.live = [b for b in self.live if id(b) not in gone]
        self.iteration = max([self.iteration] + [len(b.steps) for b in ended])
        if finished:
            self.trace_iteration(finished=ids_of(finished), kept=ids_of(self.live), forked={})
