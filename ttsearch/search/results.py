"""Run output: one JSON line per finished search, written as it goes.

A line is written whole with one ``write`` and flushed to disk before the next problem is
reported, so an interrupt (even SIGKILL) loses nothing finished. On reopening, a trailing
half-written line (no newline) is cut off, and the searches already present — a problem at
a budget n — are skipped. Every line carries the settings it was run with; reopening a file
with other settings is an error naming the settings that differ.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ttsearch.errors import TTSearchError


class ResultsError(TTSearchError, ValueError):
    """A results file that cannot be read, or resumed with these settings."""


def read_results(path: str | Path) -> list[dict]:
    """Every complete line of a results file; a line that is not JSON is an error naming it."""
    path = Path(path)
    records = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break  # a line cut by an interrupt: not a result
            if not raw.strip():
                continue
            try:
                records.append(json.loads(raw))
            except json.JSONDecodeError as exc:
                raise ResultsError(f"{path}:{number}: not a JSON line ({exc.msg})") from exc
    return records


def record_key(record: dict) -> tuple[str, int]:
    """A search is a problem at a budget: ``ttsearch run --n 4,16`` writes two lines per problem."""
    return record["id"], record["n"]


class ResultsWriter:
    """Appends records to ``path``. With ``settings``, the file's existing records must have
    been written with the same ones (``n`` aside: one file holds every budget of a run)."""

    def __init__(self, path: str | Path, settings: dict | None = None):
        self.path = Path(path)
        self.settings = None if settings is None else json.loads(json.dumps(settings))
        self.done: set[tuple[str, int]] = set()
        if self.path.exists():
            records = read_results(self.path)
            if self.settings is not None:
                check_settings(records, self.settings, self.path)
            self._drop_partial_line()
            self.done = {record_key(r) for r in records}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")

    def _drop_partial_line(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        self._file.write(line.encode())
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.add(record_key(record))

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_settings(records: list[dict], settings: dict, path: Path) -> None:
    """Raise ResultsError naming every setting in which ``path``'s records differ from ``settings``."""
    for number, record in enumerate(records, 1):
        old = record.get("settings")
        if old is None:
            raise ResultsError(f"{path}: record {number} ({record.get('id')!r}) carries no settings, so a run "
                               "cannot resume into it; write to a new --output")
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if differ:
            changes = "; ".join(f"{k}: {old.get(k)!r} in the file, {settings.get(k)!r} now" for k in differ)
            raise ResultsError(f"{path} was written with other settings ({changes}); rerun with the file's "
                               "settings to resume it, or write to a new --output")
