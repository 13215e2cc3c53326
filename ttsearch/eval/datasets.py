"""Problem sets read from JSONL: MATH-500, GSM8K, ttsearch's own format, or any file with a
field mapping. Every bad line is reported as ``path:LINE: what is wrong`` so a broken dataset
is fixed in one look instead of failing later inside a search."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ttsearch.errors import TTSearchError


class DatasetError(TTSearchError, ValueError):
    """A dataset file that cannot be read or has a malformed line."""


@dataclass(frozen=True)
class Problem:
    id: str
    question: str | list[dict]  # a question, or chat messages ending with the user's turn
    answer: str | None  # None: nothing to grade against (a question asked through the API)
    level: str | None = None
    subject: str | None = None


# Each built-in format: the keys that identify it on the first line, and how Problem's fields
# map to the file's keys. Tried in order, so the most specific comes first.
FORMATS: dict[str, dict] = {
    "ttsearch": {
        "detect": {"id", "question", "answer"},
        "fields": {"id": "id", "question": "question", "answer": "answer", "level": "level", "subject": "subject"},
    },
    "math500": {
        "detect": {"problem", "answer"},
        "fields": {"id": "unique_id", "question": "problem", "answer": "answer", "level": "level", "subject": "subject"},
    },
    "gsm8k": {
        "detect": {"question", "answer"},
        "fields": {"question": "question", "answer": "answer"},
    },
}
REQUIRED = ("question", "answer")
OPTIONAL = ("id", "level", "subject")
GSM8K_FINAL = re.compile(r"####\s*(.*?)\s*$", re.DOTALL)
NUMBER_WITH_COMMAS = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?")


def load_jsonl(path: str | Path, fields: dict | None = None, limit: int | None = None) -> list[Problem]:
    """Problems from a JSONL file, one object a line; blank lines are skipped.

    ``fields`` maps Problem's fields (question, answer, and optionally id, level, subject) to the
    file's keys; without it the format is detected from the first line's keys. Lines without an
    id (no mapping for it, or a built-in format's id key absent, as a MATH-500 file without
    ``unique_id``) get ``<file stem>-<line number>`` (GSM8K: ``gsm8k-<line number>``). ``limit``
    stops reading after that many problems."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read dataset {path}: {getattr(e, 'strerror', None) or e}") from None
    fmt, mapping = None, _check_mapping(fields, path) if fields is not None else None
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit in a string
        if limit is not None and len(problems) >= limit:
            break
        if not line.strip():
            continue
        record = _parse_line(line, path, lineno)
        if mapping is None:
            fmt, mapping = _detect(record, path, lineno)
        problem = _to_problem(record, mapping, fmt, path, lineno)
        if problem.id in first_line:
            raise DatasetError(f"{path}:{lineno}: duplicate id {problem.id!r} (first on line {first_line[problem.id]})")
        first_line[problem.id] = lineno
        problems.append(problem)
    return problems


def _check_mapping(fields: dict, path: Path) -> dict:
    unknown = sorted(set(fields) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise DatasetError(
            f"{path}: field mapping names unknown Problem fields {unknown}; known: {list(REQUIRED + OPTIONAL)}"
        )
    missing = [name for name in REQUIRED if name not in fields]
    if missing:
        raise DatasetError(f"{path}: field mapping lacks {missing} (it maps Problem fields to the file's keys)")
    return dict(fields)


def _parse_line(line: str, path: Path, lineno: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(record, dict):
        raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return record


def _detect(record: dict, path: Path, lineno: int) -> tuple[str, dict]:
    """The first built-in format whose identifying keys all appear on the first line."""
    for name, spec in FORMATS.items():
        if spec["detect"] <= record.keys():
            return name, spec["fields"]
    known = "; ".join(f"{name} ({', '.join(sorted(spec['detect']))})" for name, spec in FORMATS.items())
    raise DatasetError(
        f"{path}:{lineno}: unknown dataset format, keys {sorted(record)}; known formats: {known}; "
        f"for another format pass a field mapping such as "
        f'{{"question": "prompt", "answer": "target", "id": "key"}}'
    )


def _to_problem(record: dict, mapping: dict, fmt: str | None, path: Path, lineno: int) -> Problem:
    values = {name: _field(record, mapping[name], path, lineno) for name in REQUIRED}
    # A built-in format's id (MATH-500's unique_id) may be absent: the line number stands in.
    # An id the caller's own mapping names is required.
    id_key = mapping.get("id")
    if id_key is not None and (fmt is None or record.get(id_key) is not None):
        values["id"] = _field(record, id_key, path, lineno)
    for name in ("level", "subject"):  # optional: absent or null means unknown
        key = mapping.get(name)
        if key is not None and record.get(key) is not None:
            values[name] = _field(record, key, path, lineno)
    if fmt == "gsm8k":
        values["answer"] = _gsm8k_answer(values["answer"], path, lineno)
    values.setdefault("id", f"{'gsm8k' if fmt == 'gsm8k' else path.stem}-{lineno}")
    return Problem(**values)


def _field(record: dict, key: str, path: Path, lineno: int) -> str:
    """A non-empty field as text; numbers are accepted (MATH-500 levels are integers)."""
    if key not in record:
        raise DatasetError(f"{path}:{lineno}: missing field {key!r} (keys: {sorted(record)})")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DatasetError(f"{path}:{lineno}: field {key!r} must be a string or number, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise DatasetError(f"{path}:{lineno}: field {key!r} is empty")
    return text


def _gsm8k_answer(solution: str, path: Path, lineno: int) -> str:
    """The final answer after ``####``, with thousands separators removed (``1,000`` -> ``1000``)."""
    match = GSM8K_FINAL.search(solution)
    if match is None or not match.group(1):
        raise DatasetError(f"{path}:{lineno}: field 'answer' has no final answer after '####'")
    answer = match.group(1)
    return answer.replace(",", "") if NUMBER_WITH_COMMAS.fullmatch(answer) else answer
