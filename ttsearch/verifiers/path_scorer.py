"""Scoring posted paths (``POST /v1/score_steps``) with a verifier, incrementally.

A client that drives a search from outside (its_hub's particle filtering and beam search)
asks for the scores of every live path after each step: the same question, the paths grown
by one step, many of them copies or siblings. Scored from scratch, every request would cost
every path's every step again. Here:

- within a request, paths that share steps share a verifier state: the steps form a tree,
  each node is scored once, and a node's state is forked to its children, as a search forks
  its beams;
- across requests, a step scored before is not scored again: its score is remembered (keyed
  by the question and the whole path up to it), and the state after the longest remembered
  part of a path is rebuilt through the verifier's prefix cache (``Verifier.resume``), which
  forwards only the part of its text the cache does not hold.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from ttsearch.verifiers.base import Verifier

REMEMBERED_STEPS = 1 << 16


@dataclass(eq=False)
class _Node:
    key: bytes  # the question and every step up to this one
    step: str | None  # None at the root (the question alone)
    parent: _Node | None
    steps: list[str]  # the path up to this node
    score: float | None = None
    known: bool = False  # scored before, it and every step before it
    children: dict[str, _Node] = field(default_factory=dict)


@dataclass
class ScoredPaths:
    step_scores: list[list[float]]  # per path, per step
    aggregates: list[float | None]  # per path, by the verifier's aggregation
    steps_scored: int  # nodes of the request's tree scored now
    steps_remembered: int  # nodes of the tree scored by an earlier request
    verifier_tokens: int  # tokens the verifier's engine forwarded for it


class PathScorer:
    """Scores a question's paths (each a list of steps) with ``verifier``; remembers the
    scores of the last ``remembered`` steps it scored."""

    def __init__(self, verifier: Verifier, remembered: int = REMEMBERED_STEPS):
        self.verifier = verifier
        self.remembered = remembered
        self._scores: OrderedDict[bytes, float] = OrderedDict()

    def check(self, question: str, paths: list[list[str]]) -> None:
        """A ValueError naming what cannot be scored."""
        if self.verifier.needs_policy:
            raise ValueError(f"the server's verifier ({type(self.verifier).__name__}) judges the policy's own beams "
                             "and cannot score posted paths; serve a PRM or the arithmetic checker")
        if not isinstance(question, str) or not question:
            raise ValueError("question: expected a non-empty string")
        for i, path in enumerate(paths):
            if not isinstance(path, list) or not all(isinstance(step, str) for step in path):
                raise ValueError(f"paths[{i}]: expected a list of step strings")

    def score(self, question: str, paths: list[list[str]]) -> ScoredPaths:
        self.check(question, paths)
        root = _Node(_key(b"", question), None, None, [], known=True)
        ends, nodes = [], []
        for path in paths:
            node = root
            for step in path:
                child = node.children.get(step)
                if child is None:
                    child = _Node(_key(node.key, step), step, node, node.steps + [step])
                    child.score = self._scores.get(child.key) if node.known else None
                    child.known = child.score is not None
                    if child.known:
                        self._scores.move_to_end(child.key)
                    node.children[step] = child
                    nodes.append(child)
                node = child
            ends.append(node)
        engine = self.verifier.engine
        before = engine.tokens_forwarded if engine is not None else 0
        scored = self._score_new(question, root)
        tokens = engine.tokens_forwarded - before if engine is not None else 0
        step_scores = [[n.score for n in _path_of(end)] for end in ends]
        return ScoredPaths(step_scores, [self.verifier.aggregate(s) for s in step_scores], scored,
                           sum(n.known for n in nodes) - scored, tokens)

    def _score_new(self, question: str, root: _Node) -> int:
        """Score every node not known yet, a round per depth below the known ones, all the
        round's steps in one verifier call; returns how many were scored."""
        starts = [n for n in _walk(root) if n.known and any(not c.known for c in n.children.values())]
        if not starts:
            return 0
        states = self.verifier.resume(question, [n.steps for n in starts],
                                      [[m.score for m in _path_of(n)] for n in starts])
        held = list(states)  # every state made here: all are freed by the end, whatever happens
        scored = 0
        try:
            pending = list(zip(starts, states))  # (node, its state): its unknown children are scored next
            while pending:
                children, child_states = [], []
                for node, state in pending:
                    new = [c for c in node.children.values() if not c.known]
                    forks = self.verifier.fork(state, len(new))
                    held += forks
                    children += new
                    child_states += forks
                    self.verifier.free(state)
                scores = self.verifier.score(child_states, [c.step for c in children])
                pending = []
                for child, state, score in zip(children, child_states, scores):
                    child.score, child.known = score, True
                    self._remember(child.key, score)
                    if any(not c.known for c in child.children.values()):
                        pending.append((child, state))
                    else:
                        self.verifier.free(state)
                scored += len(children)
        finally:
            for state in held:
                if not state.freed:
                    self.verifier.free(state)
        return scored

    def _remember(self, key: bytes, score: float) -> None:
        self._scores[key] = score
        self._scores.move_to_end(key)
        while len(self._scores) > self.remembered:
            self._scores.popitem(last=False)


def _key(parent: bytes, text: str) -> bytes:
    return hashlib.blake2b(parent + text.encode("utf-8", "surrogatepass") + b"\x00", digest_size=16).digest()


def _walk(root: _Node):
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children.values())


def _path_of(node: _Node) -> list[_Node]:
    out = []
    while node.parent is not None:
        out.append(node)
        node = node.parent
    return out[::-1]
