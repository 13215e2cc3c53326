"""Particle filtering (Puri et al. 2025) and its resampling."""

from __future__ import annotations

import math

import numpy as np

from ttsearch.search.strategies.base import Beam, Strategy, as_rewards, ids_of, softmax


class ParticleFilter(Strategy):
    """Particle filtering (Puri et al. 2025): n particles; every unfinished particle writes one
    step, then all n are resampled in proportion to softmax(log-weight / resample_temperature)
    of their latest step's reward (``particle_weights``: its logit, as the authors' code, or the
    reward itself). Finished particles keep their weight and stay in the pool; a resampled
    unfinished particle's copies are forks (shared KV), a dropped one is freed at once. The
    search ends when every particle has finished (the last iteration writes to EOS). Answers:
    the final particles, copies included, as the filter's vote has them."""

    source = "Puri et al. 2025"

    def start(self, root: Beam | None = None) -> None:
        self.particles = self.start_roots(self.config.n, root=root)
        self.live = list(self.particles)

    @property
    def answers(self) -> list[Beam]:
        return [p for p in self.particles if p.finish is not None and self.is_answer(p)]

    def advance(self, ended: list[Beam]) -> None:
        c = self.config
        self.iteration += 1
        finished, _ = self.settle(self.live)
        if all(p.finish is not None for p in self.particles):
            self.trace_iteration(finished=ids_of(finished), kept=ids_of(self.particles), forked={}, pruned=[])
            self.live = []
            return
        rewards = [p.step_scores[-1] if p.step_scores else None for p in self.particles]
        weights = particle_weights(rewards, c.particle_weights, c.resample_temperature)
        counts = resample_counts(weights, c.n, c.resampling, self.rng)
        particles, kept, forked, dropped = [], [], {}, []
        for particle, copies in zip(self.particles, counts):
            if copies == 0:
                if particle.finish is None:
                    self.release(particle)
                dropped.append(particle)
                continue
            if particle.finish is None:
                extra = self.fork(particle, copies - 1) if copies > 1 else []
            else:  # a finished path holds no sequence: its copies are records only
                extra = [self._copy_finished(particle) for _ in range(copies - 1)]
            kept.append(particle)
            if extra:
                forked[particle.beam_id] = ids_of(extra)
            particles += [particle] + extra
        self.trace_iteration(finished=ids_of(finished), kept=ids_of(kept), forked=forked, pruned=ids_of(dropped),
                     weights=[round(float(w), 6) for w in weights])
        self.particles = particles
        self.live = [p for p in particles if p.finish is None]

    def _copy_finished(self, beam: Beam) -> Beam:
        return Beam(seq=None, vstate=None, steps=list(beam.steps), step_scores=list(beam.step_scores),
                    aggregate=beam.aggregate, subtree=beam.subtree, tokens=beam.tokens, finish=beam.finish,
                    beam_id=next(self._ids), parent=beam.beam_id, node=beam.node)




def particle_weights(rewards: list[float | None], kind: str = "logit", temperature: float = 1.0) -> np.ndarray:
    """Resampling probabilities from the particles' latest rewards. ``logit`` reads a reward
    in [0, 1] as a probability and weighs by its log-odds (clipped at 1e-7), as Puri et al.'s
    code does; ``reward`` weighs by the reward itself. A particle with no score weighs 0."""
    r = as_rewards(rewards)
    if kind == "logit":
        p = np.clip(r, 1e-7, 1 - 1e-7)
        r = np.where(np.isfinite(r), np.log(p / (1 - p)), -math.inf)
    return softmax(r / temperature)


def resample_counts(weights: np.ndarray, n: int, method: str, rng: np.random.Generator) -> list[int]:
    """How many of ``n`` new particles each old one becomes. Multinomial: n independent
    draws; systematic: n evenly spaced points with one random offset (lower variance)."""
    if method == "multinomial":
        return rng.multinomial(n, weights).tolist()
    if method != "systematic":
        raise ValueError(f"resampling={method!r}: expected multinomial or systematic")
    points = (rng.random() + np.arange(n)) / n
    edges = np.cumsum(weights)
    edges[-1] = 1.0
    return np.bincount(np.searchsorted(edges, points, side="right"), minlength=len(weights)).tolist()
