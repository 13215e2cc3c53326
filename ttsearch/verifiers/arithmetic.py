"""The arithmetic checker: a verifier that evaluates the equations a step writes.

An equation is arithmetic on both sides of ``=``: integers, decimals and 1,000-style
thousands; ``+ - − × ÷ * /`` (and LaTeX ``\\times \\cdot \\div``); parentheses; unary minus.
Chains ``a = b = c`` give one equation per ``=``; a line break or punctuation ends a chain,
and brackets around one (``(2 + 2 = 4)``, ``= 3.33 (rounded)``) are the text's. Each equation
is evaluated in exact rationals by a small recursive-descent parser (never ``eval``). A side
written as a decimal literal holds within half a unit of its last digit (``10 / 3 = 3.33``);
a division by zero makes the equation false.

``check(text)`` judges a text alone: 1.0 when every equation in it holds, 0.0 when any does
not, ``neutral`` (0.5) when it has none. The checker judges each step of a path in light of
what the path has established (``Progress``: the question's numbers, the results of its own
equations, its last result):

- 0.0: an equation is false, or the step states a final answer other than the path's last
  result;
- 1.0: every equation holds and calculates only with numbers of the question or earlier
  results; a final answer is verified when it equals the last result and that result was
  derived, through the path's equations, from every number of the question, each used
  as often as the question writes it;
- ``neutral`` otherwise: nothing to judge, a number from elsewhere (a unit conversion, a
  constant), or an answer that is not derived from all the question's numbers.

So a path that skips a calculation, drops an intermediate result or answers something it
did not compute ranks below one that works the problem through, which an equation check
alone cannot see.

Arithmetic that is part of something the parser does not read is skipped rather than
judged: a side touching a letter or symbol (``3x``, ``x^2 = 4``, ``5%``, ``\\frac{1}{2}``), a
side after a single-letter word or an operator word (``x = 3``, ``2 times 3 = 6``, ``half of
20 = 10``), a first side that starts with a minus after a word (``x - 2 = 5``). So are inputs
past the bounds: the first 20,000 characters of a step, 64 equations, 256 tokens a side,
nesting depth 32, 30 digits a number, 4096-bit intermediate values. Nothing in a step's text
raises.
"""

from __future__ import annotations

import re
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from fractions import Fraction

import torch

from ttsearch.aggregation import update_aggregate
from ttsearch.eval.grading import extract_answer
from ttsearch.verifiers.base import Verifier, VerifierState

MAX_CHARS = 20_000
MAX_EQUATIONS = 64
MAX_SIDE_TOKENS = 256
MAX_DEPTH = 32
MAX_DIGITS = 30
MAX_BITS = 4096

_OPERATOR_WORDS = frozenset({"of", "times", "by", "plus", "minus", "over", "per", "into"})
_OPS = {  # how an operator is written -> what the parser reads
    "+": "+",
    "-": "-",
    "−": "-",
    "*": "*",
    "×": "*",
    "\\times": "*",
    "\\cdot": "*",
    "/": "/",
    "÷": "/",
    "\\div": "/",
}
_TOKEN = re.compile(
    r"(?P<num>[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?(?![0-9])|[0-9]+(?:\.[0-9]+)?)"
    r"|(?P<op>\\times(?![A-Za-z])|\\cdot(?![A-Za-z])|\\div(?![A-Za-z])|[-−+*×/÷()=])"
    r"|(?P<space>[^\S\n]+)"
    r"|(?P<punct>\\[()\[\]]|[\n.,:;?$\"\[\]])"
    r"|(?P<word>[A-Za-z]+)"
    r"|(?P<other>\\[A-Za-z]+|.)",
    re.S,
)


@dataclass(frozen=True)
class Equation:
    left: str
    right: str
    holds: bool
    operands: tuple[Fraction, ...] = ()  # the numbers written on the left side
    result: Fraction | None = None  # the right side's value (None: undefined)


class _Skip(Exception):
    """The arithmetic cannot be judged (malformed, or past a bound)."""


class _Undefined(Exception):
    """Division by zero."""


@dataclass(frozen=True)
class _Tok:
    kind: str  # num | op | space | punct | word | other
    text: str


def _tokens(text: str) -> list[_Tok]:
    return [_Tok(m.lastgroup, m.group()) for m in _TOKEN.finditer(text[:MAX_CHARS])]


def _binding(tok: _Tok | None, adjacent: bool) -> bool:
    """Whether a token next to a run of arithmetic may belong to the same expression."""
    if tok is None or tok.kind == "punct":
        return False
    if tok.kind == "word":
        return adjacent or len(tok.text) == 1 or tok.text.lower() in _OPERATOR_WORDS
    return adjacent  # a symbol: "x^2", "5%", "\\frac{"


def _segments(toks: list[_Tok]):
    """Runs of arithmetic tokens (spaces inside kept out), each with the nearest token before and
    after it and whether that token touches the run."""
    i, n = 0, len(toks)
    while i < n:
        if toks[i].kind not in ("num", "op"):
            i += 1
            continue
        start = i
        while i < n and toks[i].kind in ("num", "op", "space"):
            i += 1
        end = i
        while toks[end - 1].kind == "space":
            end -= 1
        before = start - 1
        while before >= 0 and toks[before].kind == "space":
            before -= 1
        after = end
        while after < n and toks[after].kind == "space":
            after += 1
        run = [t for t in toks[start:end] if t.kind != "space"]
        prev = (toks[before], before == start - 1) if before >= 0 else (None, False)
        nxt = (toks[after], after == end) if after < n else (None, False)
        yield run, prev, nxt


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary)* ;
    unary := '-' unary | primary ; primary := number | '(' expr ')'"""

    def __init__(self, toks: list[_Tok]):
        if not toks or len(toks) > MAX_SIDE_TOKENS:
            raise _Skip
        self.toks, self.pos, self.depth = toks, 0, 0

    def parse(self) -> Fraction:
        value = self.expr()
        if self.pos != len(self.toks):
            raise _Skip
        return value

    @contextmanager
    def _nested(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Skip
        try:
            yield
        finally:
            self.depth -= 1

    def _peek(self) -> str | None:
        if self.pos < len(self.toks) and self.toks[self.pos].kind == "op":
            return _OPS.get(self.toks[self.pos].text, self.toks[self.pos].text)
        return None

    def expr(self) -> Fraction:
        value = self.term()
        while self._peek() in ("+", "-"):
            op = self._peek()
            self.pos += 1
            value = _bounded(value + self.term() if op == "+" else value - self.term())
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self._peek() in ("*", "/"):
            op = self._peek()
            self.pos += 1
            rhs = self.unary()
            if op == "/" and rhs == 0:
                raise _Undefined
            value = _bounded(value * rhs if op == "*" else value / rhs)
        return value

    def unary(self) -> Fraction:
        if self._peek() == "-":
            self.pos += 1
            with self._nested():
                return -self.unary()
        return self.primary()

    def primary(self) -> Fraction:
        if self.pos >= len(self.toks):
            raise _Skip
        tok = self.toks[self.pos]
        self.pos += 1
        if tok.kind == "num":
            return _number(tok.text)
        if tok.text == "(":
            with self._nested():
                value = self.expr()
            if self._peek() != ")":
                raise _Skip
            self.pos += 1
            return value
        raise _Skip


def _number(text: str) -> Fraction:
    digits = text.replace(",", "")
    if len(digits) - ("." in digits) > MAX_DIGITS:
        raise _Skip
    return Fraction(digits)


def _bounded(value: Fraction) -> Fraction:
    if value.numerator.bit_length() > MAX_BITS or value.denominator.bit_length() > MAX_BITS:
        raise _Skip
    return value


def _tolerance(side: list[_Tok]) -> Fraction:
    """Half a unit of the last digit of a side written as one decimal literal; else exact."""
    if len(side) == 1 and side[0].kind == "num" and "." in side[0].text:
        return Fraction(1, 2 * 10 ** len(side[0].text.split(".")[1]))
    return Fraction(0)


def _unwrap(side: list[_Tok], front: bool) -> list[_Tok]:
    """Drop unbalanced brackets at the outer end (``front``: the first side's start, else the
    last side's end) of a chain: the text's, as in ``(2 + 2 = 4)`` or ``= 3.33 (rounded)``."""
    depth = sum((t.text == "(") - (t.text == ")") for t in side)
    end = 0 if front else -1
    while side and ((depth > 0 and side[end].text == "(") or (depth < 0 and side[end].text == ")")):
        depth += -1 if side[end].text == "(" else 1
        side = side[1:] if front else side[:-1]
    return side


def _judge(left: list[_Tok], right: list[_Tok]) -> Equation:
    try:
        lhs, rhs = _Parser(left).parse(), _Parser(right).parse()
    except _Undefined:
        return Equation(_text(left), _text(right), False, _operands(left))
    holds = abs(lhs - rhs) <= max(_tolerance(left), _tolerance(right))
    return Equation(_text(left), _text(right), holds, _operands(left), rhs)


def _operands(side: list[_Tok]) -> tuple[Fraction, ...]:
    """The numbers written on a side, read once the parser has bounded it."""
    return tuple(_number(t.text) for t in side if t.kind == "num")


def _text(toks: list[_Tok]) -> str:
    return " ".join(t.text for t in toks)


def equations(text: str) -> list[Equation]:
    """The equations in ``text`` that can be judged, each with whether it holds."""
    found = []
    for run, (prev, prev_adjacent), (nxt, next_adjacent) in _segments(_tokens(text)):
        sides, side = [], []
        for tok in run:
            if tok.text == "=":
                sides.append(side)
                side = []
            else:
                side.append(tok)
        sides.append(side)
        if len(sides) < 2:
            continue
        leading_minus = bool(sides[0]) and _OPS.get(sides[0][0].text) == "-"
        first_bound = _binding(prev, prev_adjacent) or (leading_minus and prev is not None and prev.kind == "word")
        last_bound = _binding(nxt, next_adjacent)
        first, last = _unwrap(sides[0], front=True), _unwrap(sides[-1], front=False)
        # a bracket dropped at an end stands between the equation and the text next to it
        first_bound &= len(first) == len(sides[0])
        last_bound &= len(last) == len(sides[-1])
        sides[0], sides[-1] = first, last
        for i in range(len(sides) - 1):
            left, right = sides[i], sides[i + 1]
            if (i == 0 and first_bound) or (i + 1 == len(sides) - 1 and last_bound):
                continue
            try:
                found.append(_judge(left, right))
            except _Skip:
                continue
            if len(found) == MAX_EQUATIONS:
                return found
    return found


def check(text: str, neutral: float = 0.5) -> float:
    """1.0 if every equation in ``text`` holds, 0.0 if any does not, ``neutral`` if it has none."""
    found = equations(text)
    if not found:
        return neutral
    return 1.0 if all(e.holds for e in found) else 0.0


def numbers(text: str) -> list[Fraction]:
    """The numbers written in ``text``, in order, repeats included."""
    found = []
    for tok in _tokens(text):
        if tok.kind == "num":
            with suppress(_Skip):
                found.append(_number(tok.text))
    return found


def _answer_value(text: str) -> Fraction | None:
    """The number a final answer states (``5``, ``-5``, ``$1,200``, ``5 cards``), or None."""
    answer = extract_answer(text)
    if answer is None:
        return None
    toks = [t for t in _tokens(answer) if t.kind in ("num", "op")]
    if sum(t.kind == "num" for t in toks) != 1:
        return None
    try:
        return _Parser(toks).parse()
    except (_Skip, _Undefined):
        return None


@dataclass(frozen=True)
class Progress:
    """What a path has established: the question's numbers, and each value its equations
    derived with the question numbers it was derived from (its support, repeats included:
    ``7 * 9 + 3 * 7`` needs the 7 twice). ``last`` is the last value derived."""

    given: tuple[Fraction, ...]
    derived: tuple[tuple[Fraction, tuple[Fraction, ...]], ...] = ()
    last: Fraction | None = None

    @classmethod
    def of(cls, question: str) -> Progress:
        return cls(tuple(sorted(numbers(question))))


def judge(progress: Progress, step: str, neutral: float = 0.5) -> tuple[float, Progress]:
    """The score of ``step`` written after ``progress`` (see the module notes), and the
    progress after it."""
    given, derived, last = set(progress.given), dict(progress.derived), progress.last
    found = equations(step)
    false = any(not e.holds for e in found)
    grounded = bool(found)
    for e in found:  # in order: a value may feed the next equation of the same step
        support: list[Fraction] = []
        for x in e.operands:
            if x in derived:
                support += derived[x]
            elif x in given:
                support.append(x)
            else:
                grounded = False
        if e.result is not None:
            derived[e.result] = tuple(sorted(support))
            last = e.result
    score = 0.0 if false else 1.0 if grounded else neutral
    answer = _answer_value(step)
    if answer is not None and not false:
        if answer != last:
            score = 0.0
        elif derived[last] == progress.given and (grounded or not found):
            score = 1.0  # derived from every number of the question, each used once
        else:
            score = neutral
    return score, Progress(progress.given, tuple(derived.items()), last)


class ArithmeticChecker(Verifier):
    """Scores each step with ``judge``, following each path's ``Progress``; no model."""

    def __init__(self, aggregation: str = "last", neutral: float = 0.5):
        super().__init__(aggregation)
        if not 0.0 <= neutral <= 1.0:
            raise ValueError(f"neutral={neutral!r}: expected a score in [0, 1]")
        self.neutral = neutral

    def new(self, question: str, policy_seq=None) -> VerifierState:
        state = super().new(question, policy_seq)
        state.context = Progress.of(question)
        return state

    def resume(self, question, paths, scores):
        states = super().resume(question, paths, scores)
        for state in states:
            for step in state.steps:  # the path's progress, judged again (no model: cheap)
                _, state.context = judge(state.context, step, self.neutral)
        return states

    def _score(self, states, steps, policy_seqs, prev_agg, prev_count):
        judged = [judge(state.context, step, self.neutral) for state, step in zip(states, steps)]
        for state, (_, progress) in zip(states, judged):
            state.context = progress
        scores = torch.tensor([score for score, _ in judged], dtype=torch.float32)
        return scores, update_aggregate(prev_agg, prev_count, scores, self.aggregation)
