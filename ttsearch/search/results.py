"""Run output: one JSON line per finished problem, written as it goes.

A line is written whole with one ``write`` and flushed to disk before the next problem is
reported, so an interrupt (even SIGKILL) loses nothing finished. On reopening, a trailing
half-written line (no newline) is cut off, and the ids already present are skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class ResultsError(ValueError):
    pass


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


class ResultsWriter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done_ids: set[str] = set()
        if self.path.exists():
            self._drop_partial_line()
            self.done_ids = {r["id"] for r in read_results(self.path)}
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
        self.done_ids.add(record["id"])

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
