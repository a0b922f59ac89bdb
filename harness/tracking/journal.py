"""The tracker's write-ahead journal: every call a run makes to MLflow, on disk before it is sent.

One JSON object per line in ``<checkpoint folder>/tracking.jsonl``: a header naming the run's config
fingerprint, then the entries numbered from 1 (``params``, ``tags``, ``metrics``, ``text``, ``end``).
``tracking.ack.json`` holds the run's MLflow id and the highest entry MLflow has stored. A crash loses
nothing that was appended: the run's next process (a retried trial, ``--resume``) opens the same journal
and sends what was not acknowledged. Sending twice stores once: metrics carry their own timestamp (MLflow
keeps one row per key, value, timestamp and step), params and tags are re-set to the same values,
artifacts overwritten. A line torn by a crash is the last one and is dropped.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from midasbench.harness.errors import TrackingError

JOURNAL_FILE, ACK_FILE = "tracking.jsonl", "tracking.ack.json"


class JournalError(TrackingError):
    """A journal that cannot be read back (names the file and line)."""


@dataclass(frozen=True)
class Entry:
    seq: int
    op: str  # params | tags | metrics | text | end
    data: dict[str, Any]


@dataclass
class Journal:
    """Entries of one run, in memory and (with a ``directory``) on disk; thread-safe appends."""

    directory: Path | None
    fingerprint: str
    run_key: str = field(default_factory=lambda: uuid.uuid4().hex)
    entries: list[Entry] = field(default_factory=list)
    acked: int = 0
    run_id: str | None = None
    last_seq: int = 0  # numbers are never reused, also after ``drop_pending``
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.last_seq = max([self.last_seq, *(e.seq for e in self.entries)])

    @classmethod
    def open(cls, directory: Path | None, fingerprint: str, adopt: bool = True) -> Journal:
        """This run's journal in ``directory``: the one there when ``adopt`` and it belongs to the same
        config and has not ended; else a new one (an earlier journal is kept beside, renamed)."""
        if directory is None:
            return cls(None, fingerprint)
        path = directory / JOURNAL_FILE
        if path.is_file():
            old = cls._read(directory)
            if adopt and old.fingerprint == fingerprint and not old.ended():
                return old
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for name in (JOURNAL_FILE, ACK_FILE):
                if (directory / name).is_file():
                    os.replace(directory / name, directory / f"{name}.{stamp}.superseded")
        journal = cls(directory, fingerprint)
        directory.mkdir(parents=True, exist_ok=True)
        header = {"seq": 0, "op": "journal", "fingerprint": fingerprint, "run_key": journal.run_key}
        journal._write_line(header)
        return journal

    @classmethod
    def _read(cls, directory: Path) -> Journal:
        path = directory / JOURNAL_FILE
        lines = path.read_text().splitlines()
        records: list[dict[str, Any]] = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):  # torn by a crash while it was written: never acknowledged
                    break
                raise JournalError(f"{path}: line {number} is not a journal entry") from None
        if not records or records[0].get("op") != "journal":
            raise JournalError(f"{path}: no journal header on line 1")
        header = records[0]
        entries = [Entry(r["seq"], r["op"], r.get("data", {})) for r in records[1:]]
        journal = cls(directory, header["fingerprint"], header["run_key"], entries)
        ack_path = directory / ACK_FILE
        if ack_path.is_file():
            ack = json.loads(ack_path.read_text())
            journal.acked, journal.run_id = int(ack["acked"]), ack.get("run_id")
        return journal

    # ---- writing
    def append(self, op: str, data: dict[str, Any]) -> int:
        with self._lock:
            seq = self.last_seq = self.last_seq + 1
            self._write_line({"seq": seq, "op": op, "data": data})
            self.entries.append(Entry(seq, op, data))
            return seq

    def _write_line(self, record: dict[str, Any]) -> None:
        if self.directory is None:
            return
        with open(self.directory / JOURNAL_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def acknowledge(self, seq: int, run_id: str | None = None) -> None:
        """Everything up to ``seq`` is stored in MLflow (atomically recorded)."""
        with self._lock:
            self.acked = max(self.acked, seq)
            self.run_id = run_id or self.run_id
            if self.directory is None:
                return
            path = self.directory / ACK_FILE
            tmp = path.with_name(f".{ACK_FILE}.tmp-{os.getpid()}-{threading.get_ident()}")
            tmp.write_text(json.dumps({"acked": self.acked, "run_id": self.run_id}))
            os.replace(tmp, path)

    def drop_pending(self, op: str, upto: int) -> None:
        """Forget the unsent entries of kind ``op`` numbered at most ``upto`` (an adopting attempt
        journals the run's params anew and ends it itself)."""
        with self._lock:
            self.entries = [e for e in self.entries if e.seq <= self.acked or e.op != op or e.seq > upto]

    # ---- reading
    def pending(self) -> list[Entry]:
        with self._lock:
            return [e for e in self.entries if e.seq > self.acked]

    def ended(self) -> bool:
        """True when the run's end was stored: nothing of it is left to send."""
        return any(e.op == "end" and e.seq <= self.acked for e in self.entries)

    @property
    def path(self) -> Path | None:
        return None if self.directory is None else self.directory / JOURNAL_FILE
