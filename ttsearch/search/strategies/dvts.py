"""Diverse verifier tree search, as search-and-learn's."""

from __future__ import annotations

from ttsearch.search.strategies.base import Beam, Lookahead, ids_of


class DVTS(Lookahead):
    """Diverse verifier tree search: n / M independent subtrees. Each iteration a subtree's
    path writes M candidate steps; the best-scored candidate becomes its path, and the
    subtree ends when that candidate finished (or holds a ``\\boxed{}`` answer, as
    search-and-learn's rule has it); the last iteration writes to EOS. A subtree answers with
    its last iteration's finished candidates: at most n answers, never an unfinished one."""

    source = "search-and-learn"
    selects_every_budget = True

    def start(self, root: Beam | None = None) -> None:
        width = self.config.beam_width
        self.live = self.start_roots(self.config.n, subtree_of=lambda i: i // width, root=root)

    def _iterate(self, ended: list[Beam]) -> None:
        candidates = self.live
        if self.iteration >= self.config.max_iterations or not self._look_ahead(candidates):
            self._decide(candidates, [b.aggregate for b in candidates])

    def is_answer(self, beam: Beam) -> bool:
        return super().is_answer(beam) or (beam.finish is None and "boxed{" in beam.text)

    def _decide(self, candidates: list[Beam], scores: list[float | None]) -> None:
        c = self.config
        score_of = {id(b): s for b, s in zip(candidates, scores)}
        kept, pruned, forked, finished, children = [], [], {}, [], []
        for subtree in sorted({b.subtree for b in candidates}):
            group = [b for b in candidates if b.subtree == subtree]
            best = self.rank(group, [score_of[id(b)] for b in group])[0]
            if best.finish is not None or "boxed{" in best.text or self.iteration >= c.max_iterations:
                for beam in group:  # the subtree ends: its finished candidates are its answers
                    answer = self.is_answer(beam)
                    (self.completions if answer else self.unfinished).append(beam)
                    (finished if answer else pruned).append(beam)
                    self.release(beam)
                continue
            for beam in group:
                if beam is not best:
                    pruned.append(beam)
                    self.release(beam)
            kids = self.fork(best, c.beam_width)
            self.release(best)
            kept.append(best)
            forked[best.beam_id] = [kid.beam_id for kid in kids]
            children += kids
        self.trace_iteration(finished=ids_of(finished), kept=ids_of(kept), forked=forked, pruned=ids_of(pruned))
        self.live = children
