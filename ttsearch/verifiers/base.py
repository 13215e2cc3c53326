"""The verifier interface the search drives: one state per beam, forked and freed with the beams.

A verifier of your own subclasses ``Verifier`` and overrides ``score_steps`` (the question,
each path's earlier steps and its new step in, one score per step out); the built-in ones
override ``_score`` to work on their own state (a PRM's KV tree). ``register_verifier``
makes one loadable by name (``--verifier NAME``).

    verifier = load_verifier("arithmetic")
    root = verifier.new(question)                     # per problem
    beams = verifier.fork(root, 4)                    # with the policy's fork
    scores = verifier.score(beams, steps)             # the new step of every beam, one batch
    beams[0].step_scores, beams[0].aggregate          # updated in place
    verifier.free(root)

Like the engine's sequences, a forked state stays live until it is freed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ttsearch.aggregation import AGGREGATIONS, update_aggregate
from ttsearch.engine.sequence import Seq

_ids = itertools.count()


@dataclass(eq=False)
class VerifierState:
    """One beam's verifier state. ``step_scores`` and ``aggregate`` (over the steps, per the
    verifier's aggregation; None before the first step) are updated by ``Verifier.score``."""

    step_scores: list[float] = field(default_factory=list)
    aggregate: float | None = None
    seq: Seq | None = None  # the verifier's own sequence, for model-based verifiers
    context: Any = None  # what the step format needs next; immutable, so forks share it
    question: str = ""
    steps: tuple[str, ...] = ()  # the steps scored so far (immutable: forks share it)
    freed: bool = False
    owner: int = -1  # id of the verifier that made it
    state_id: int = field(default_factory=lambda: next(_ids))

    def __repr__(self) -> str:
        status = "freed" if self.freed else f"{len(self.step_scores)} steps, aggregate {self.aggregate}"
        return f"VerifierState(id={self.state_id}, {status})"


class Verifier:
    """Scores reasoning steps. A subclass overrides ``score_steps`` (the simple way) or
    ``_score`` (to keep its own per-state context); those that hold a sequence per state also
    extend ``new`` and implement ``_fork_seqs``/``_free_seq``, and set ``engine``.

    ``engine`` is the Engine whose KV pool the verifier writes to (None for a checker that
    holds no cache); ``last_tokens`` gives, after each ``score``, the tokens it forwarded for
    each state, so a search can count each problem's verifier work exactly."""

    engine = None
    #: it judges the policy's own beams (``score``'s ``policy_seqs``), so it cannot score posted text
    needs_policy = False

    def __init__(self, aggregation: str = "last"):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}")
        self.aggregation = aggregation
        self.verifier_id = next(_ids)
        self.last_tokens: list[int] = []

    def new(self, question: str, policy_seq: Seq | None = None) -> VerifierState:
        """The state of a problem's root, before any step. ``policy_seq`` is the policy's
        sequence for it, for verifiers that read the policy's cache."""
        if not isinstance(question, str):
            raise TypeError(f"new: question must be a str, got {type(question).__name__}")
        return VerifierState(owner=self.verifier_id, question=question)

    def resume(self, question: str, paths: list[list[str]], scores: list[list[float]]) -> list[VerifierState]:
        """States after each of ``paths`` (steps already scored, with ``scores``), rebuilt
        without scoring those steps again. A verifier that keeps its own context per state
        rebuilds it (a PRM re-adds the path's ids through its engine's prefix cache)."""
        states = []
        for steps, step_scores in zip(paths, scores):
            state = self.new(question)
            state.steps, state.step_scores = tuple(steps), list(step_scores)
            state.aggregate = self.aggregate(step_scores)
            states.append(state)
        return states

    def aggregate(self, step_scores: list[float]) -> float | None:
        """The aggregate of a path's step scores, as ``score`` keeps it (None before any)."""
        aggregate = None
        for count, score in enumerate(step_scores):
            aggregate = update_aggregate(torch.tensor([aggregate or 0.0]), torch.tensor([count]),
                                         torch.tensor([float(score)]), self.aggregation).item()
        return aggregate

    def fork(self, state: VerifierState, k: int) -> list[VerifierState]:
        """``k`` children with the parent's scores; the parent stays live."""
        self._check_states([state], "fork")
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"fork: k must be a positive int, got {k!r}")
        return [
            VerifierState(list(state.step_scores), state.aggregate, seq, state.context, question=state.question,
                          steps=state.steps, owner=self.verifier_id)
            for seq in self._fork_seqs(state, k)
        ]

    def free(self, state: VerifierState) -> None:
        """Release the state (a preempted one too)."""
        self._check_states([state], "free", allow_preempted=True)
        self._free_seq(state)
        state.freed = True

    def preempt(self, state: VerifierState) -> None:
        """Release the state's cache blocks, keeping its tokens, until ``restore``."""
        self._check_states([state], "preempt")
        if state.seq is not None:
            self.engine.preempt(state.seq)

    def restore(self, state: VerifierState) -> None:
        """Recompute a preempted state's cache (``KVCacheFullError`` if the pool is full now)."""
        if state.seq is not None:
            self.engine.restore(state.seq)

    def blocks_to_start(self, question: str) -> int:
        """Blocks of the verifier's pool that ``new(question)`` takes (0 for a checker)."""
        return 0

    def blocks_to_score(self, states: int) -> int:
        """Blocks of the verifier's pool that scoring a step of each of ``states`` states takes
        at least (a step's first block and a copied tail each); 0 for a checker."""
        return 0

    def score(
        self, states: Sequence[VerifierState], steps: Sequence[str], policy_seqs: Sequence[Seq] | None = None
    ) -> list[float]:
        """Score the new step of each state in one batch (``policy_seqs[i]``, where given, is the
        policy beam that wrote ``steps[i]``, the step already appended). Appends each score to
        the state's ``step_scores``, updates its ``aggregate``, and returns the scores."""
        states = list(states)
        self._check_states(states, "score")
        steps = list(steps)
        if len(steps) != len(states) or not all(isinstance(s, str) for s in steps):
            raise ValueError(f"score: expected {len(states)} step strings, got {steps!r:.200}")
        if policy_seqs is not None and len(policy_seqs) != len(states):
            raise ValueError(f"score: {len(states)} states but {len(policy_seqs)} policy sequences")
        if not states:
            return []
        prev_agg = torch.tensor([s.aggregate or 0.0 for s in states], dtype=torch.float32)
        prev_count = torch.tensor([len(s.step_scores) for s in states], dtype=torch.int64)
        self.last_tokens = [0] * len(states)
        scores, aggregates = self._score(states, steps, policy_seqs, prev_agg, prev_count)
        scores, aggregates = scores.tolist(), aggregates.tolist()
        for state, step, score, aggregate in zip(states, steps, scores, aggregates):
            state.step_scores.append(score)
            state.aggregate = aggregate
            state.steps += (step,)
        return scores

    def score_steps(self, questions: list[str], paths: list[list[str]], steps: list[str]) -> list[float]:
        """One score per new step: ``steps[i]`` follows the earlier steps ``paths[i]`` of a
        solution to ``questions[i]``. Override this in a verifier of your own; the base
        class aggregates the scores along each path."""
        raise NotImplementedError(f"{type(self).__name__} implements neither score_steps nor _score")

    def _score(self, states, steps, policy_seqs, prev_agg, prev_count) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, aggregates), float32 ``[len(states)]``; ``prev_agg``/``prev_count`` are the
        states' aggregates and step counts so far (CPU tensors). Sets ``last_tokens`` when it
        forwards tokens. A full KV pool must raise before anything changes."""
        scores = self.score_steps([s.question for s in states], [list(s.steps) for s in states], steps)
        if len(scores) != len(states):
            raise ValueError(f"{type(self).__name__}.score_steps returned {len(scores)} scores for {len(states)} steps")
        scores = torch.tensor([float(x) for x in scores], dtype=torch.float32)
        return scores, update_aggregate(prev_agg, prev_count, scores, self.aggregation)

    def _fork_seqs(self, state: VerifierState, k: int) -> list[Seq | None]:
        return [None] * k

    def _free_seq(self, state: VerifierState) -> None:
        pass

    def _check_states(self, states: list[VerifierState], what: str, allow_preempted: bool = False) -> None:
        seen = set()
        for state in states:
            if not isinstance(state, VerifierState):
                raise TypeError(f"{what}: expected a VerifierState, got {type(state).__name__}")
            if state.freed:
                raise ValueError(f"{what}: {state!r} was freed")
            if state.seq is not None and state.seq.preempted and not allow_preempted:
                raise ValueError(f"{what}: {state!r} is preempted: restore it first")
            if state.owner != self.verifier_id:
                raise ValueError(f"{what}: {state!r} belongs to another verifier")
            if state.state_id in seen:
                raise ValueError(f"{what}: {state!r} appears twice in one batch")
            seen.add(state.state_id)

