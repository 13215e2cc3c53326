"""Final answers pulled out of completions and compared with math-verify.

math-verify bounds its parsing and comparison time with ``signal.alarm``, which only works in
the main thread. Here the timeouts apply in the main thread; in any other thread they are off,
so grading still works there but a pathological answer (a power tower, say) can take long.
Grade untrusted text at scale from the main thread or from worker processes.
"""

from __future__ import annotations

import functools
import logging
import re
import threading

from math_verify import parse, verify
from math_verify.errors import TimeoutException
from math_verify.utils import timeout
from sympy import Basic, Eq, Expr, Symbol
from sympy.matrices import MatrixBase

TIMEOUT_S = 2  # per parse or comparison; legitimate answers take milliseconds
KEY_DIGITS = 12  # significant digits that decide whether two numeric answers share a key
CACHE_SIZE = 4096  # answers (and answer pairs) whose parse (comparison) is kept

BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
FINAL_ANSWER = re.compile(r"####|\banswer\s*(?:is\s*)?[:=]|\banswer\s+is\b", re.IGNORECASE)
SENTENCE_END = re.compile(r"\.(?:\s|$)")
WORD = re.compile(r"[A-Za-z]{2,}")


class _DropTimeoutNotices(logging.Filter):
    """math-verify warns when timeouts are off (our choice off the main thread) and on every
    timeout (with the whole answer text); both are expected outcomes here, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutNotices())


def extract_answer(text: str) -> str | None:
    """The final answer in a completion: the content of the last ``\\boxed{}`` or ``\\fbox{}``,
    else the text after the last ``The answer is``/``Answer:``/``####``; None if there is none.

    A box whose braces never close (a completion cut off inside it) gives None rather than an
    earlier box: the earlier one was not the model's last word."""
    boxes = list(BOXED.finditer(text))
    if boxes:
        content = (_braced(text, boxes[-1].end()) or "").strip()
        while (box := BOXED.match(content)) and _braced(content, box.end()) == content[box.end() : -1]:
            content = content[box.end() : -1].strip()  # \boxed{\boxed{5}} -> 5
        return content or None
    for match in reversed(list(FINAL_ANSWER.finditer(text))):
        answer = _clean_final(text[match.end() :].split("\n", 1)[0])
        if answer:
            return answer
    return None


def _braced(text: str, start: int) -> str | None:
    """The text from ``start`` up to the brace closing the one just before it; escaped braces
    (``\\{``, ``\\}``) are content, not structure."""
    depth, i = 1, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return text[start:i]
        i += 1
    return None


def _clean_final(fragment: str) -> str:
    """``$\\frac{1}{2}$. I hope it is correct.`` -> ``\\frac{1}{2}``: first sentence, no
    markdown emphasis, no math delimiters, no trailing period."""
    text = SENTENCE_END.split(fragment, maxsplit=1)[0].strip().strip("*").strip()
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
            text = text[len(left) : len(text) - len(right)].strip()
    return text.rstrip(".").strip()


def is_equivalent(a: str, b: str) -> bool:
    """Whether two final answers are the same mathematically (``\\frac{1}{2}`` and ``0.5``,
    ``90^\\circ`` and ``90``, ``\\text{(C)}`` and ``C``, ``x=5`` and ``5``). ``b`` is taken as
    the reference where that matters (math-verify unwraps an assignment only in the reference).
    Falls back to comparing normalized text when math-verify parses nothing; never raises."""
    return _equivalent(a, b, _timeout())


# A search's completions repeat the same few answers: each pair is compared once.
@functools.lru_cache(maxsize=CACHE_SIZE)
def _equivalent(a: str, b: str, timeout_s: int | None) -> bool:
    try:
        na, nb = _normalize(a), _normalize(b)
        if na and na == nb:
            return True
        pa, pb = _parse_boxed(a, timeout_s), _parse_boxed(b, timeout_s)
        if not pa or not pb:
            return False
        return bool(verify(pb, pa, timeout_seconds=timeout_s))
    except (Exception, TimeoutException):
        return False


def grade(completion_text: str, reference_answer: str) -> bool:
    """Whether the completion's final answer equals the reference; no answer is wrong."""
    answer = extract_answer(completion_text)
    return answer is not None and is_equivalent(answer, reference_answer)


def answer_key(answer: str) -> str:
    """A canonical string so equivalent answers vote together: numbers become their value to
    ``KEY_DIGITS`` significant digits (``0.5``, ``\\frac{1}{2}``, ``\\dfrac12`` -> ``0.5``;
    ``2^{10}``, ``1,024`` -> ``1024``), an assignment its right side, other parsed answers
    sympy's printing, and what math-verify cannot parse its normalized text."""
    try:
        if WORD.fullmatch(answer.strip()):  # "Evelyn" parses as E*e*l*n*v*y; \text{Evelyn} as evelyn
            return answer.strip().lower()
        for parsed in _parse(answer):
            if isinstance(parsed, (Basic, MatrixBase)):
                return timeout(timeout_seconds=_timeout())(_sympy_key)(parsed)
    except (Exception, TimeoutException):
        pass
    return _normalize(answer)


def _sympy_key(expr: Basic | MatrixBase) -> str:
    """Numbers by value, since math-verify's printing keeps how they were written (``5*(1/100)``)."""
    if isinstance(expr, Eq) and isinstance(expr.lhs, Symbol):
        expr = expr.rhs
    if isinstance(expr, Expr) and expr.is_number:
        if expr.is_Integer:
            return str(expr)
        value = expr.evalf(KEY_DIGITS)
        if value.is_Float:
            mantissa, e, exponent = str(value).partition("e")
            return mantissa.rstrip("0").rstrip(".") + e + exponent if "." in mantissa else str(value)
        return str(value)
    return str(expr)


def _parse(answer: str) -> list:
    """math-verify's parse of a bare answer: boxing it makes math-verify read all of it as one
    LaTeX answer (``1,-2`` is a set, not the first number it sees). Shared: do not modify."""
    return _parse_boxed(answer, _timeout())


@functools.lru_cache(maxsize=CACHE_SIZE)
def _parse_boxed(answer: str, timeout_s: int | None) -> list:
    return parse("\\boxed{" + answer + "}", parsing_timeout=timeout_s)


def _normalize(text: str) -> str:
    """Spacing- and dollar-insensitive text without a trailing period (case kept: \\Delta is
    not \\delta)."""
    return " ".join(text.strip().strip("$").strip().rstrip(".").split())


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
