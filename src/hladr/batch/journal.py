"""The journal: every finished task appended to ``journal.jsonl`` (fsync'd), keyed by the files'
SHA-256, so a run killed at any point continues with ``resume=True`` without redoing finished work."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..atomic import atomic_write

JOURNAL = "journal.jsonl"

JOURNAL = "journal.jsonl"


class Journal:
    """Append-only record of finished tasks, one fsync'd JSON line each.

    A line torn by a kill is ignored on reading. The last record of a key wins.
    """

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        self._broken = False
        if resume and path.exists():
            with open(path, "rb") as fh:
                for raw in fh:
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(record, dict) and "key" in record:
                        self.records[record["key"]] = record
        elif not resume:
            atomic_write(path, b"", parents=True)
        self._fh = open(path, "ab")
        if self._fh.tell() > 0:
            with open(path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    self._fh.write(b"\n")

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def add(self, record: dict[str, Any]) -> None:
        """Append ``record``; a filesystem fault (a full disk) is raised naming the journal."""
        self.records[record["key"]] = record
        try:
            self._fh.write(json.dumps(record, sort_keys=True).encode("utf-8") + b"\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            self._broken = True
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc

    def close(self) -> None:
        """Close the file (after a failed :meth:`add` the line it could not write is dropped: the
        fault was raised there, and a torn line is ignored on reading)."""
        try:
            self._fh.close()
        except OSError:
            if not self._broken:
                raise


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
