"""A run's MLflow tracker that never loses a record and never takes the training down with the server.

Every call goes to the run's write-ahead journal first (``journal.py``) and returns; a background thread
creates the run (``start`` does not wait for the store either) and sends the journal to MLflow in
batches (one ``log_batch`` per epoch: the params once, then each epoch's metrics), retrying transient
failures with backoff for as long as the run trains. ``end`` appends the run's status and waits, at most
``flush_timeout_s``, until everything is stored: only then is the run marked FINISHED (the status is the
journal's last entry). A store that stays unreachable fails the run with a ``TrackingError`` naming the
store; the journal keeps every record and the run's next attempt sends them into the same MLflow run.

Run creation is made safe to repeat: the run carries a ``midasbench.run_key`` tag from the journal, a
retry finds a run an earlier try created before its answer was lost, and runs the HTTP layer created
twice are deleted but one.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from midasbench.harness.errors import TrackingError

from .journal import Entry, Journal
from .retry import backoff_delays, is_transient

RUN_KEY_TAG = "midasbench.run_key"
IDENTITY_TAG = "midasbench.trial"  # a sweep trial's key: with its parent run, identifies its one MLflow run
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's limits per log_batch


class MlflowTracker:
    def __init__(
        self,
        uri: str,
        experiment: str,
        journal_dir: Path | None = None,
        fingerprint: str = "",
        *,
        adopt: bool = True,
        flush_timeout_s: float = 600.0,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.uri, self.experiment = uri, experiment
        self.client = MlflowClient(tracking_uri=uri)
        self.journal = Journal.open(journal_dir, fingerprint, adopt=adopt)
        self.flush_timeout_s = flush_timeout_s
        self._wake, self._closing = threading.Event(), threading.Event()
        self._deadline = math.inf
        self._last_error: BaseException | None = None
        self._fatal: BaseException | None = None
        self._flusher: threading.Thread | None = None
        self._opening: _Opening | None = None  # the run to create or adopt before anything is sent

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id, once created or adopted (kept in the journal's acknowledgement)."""
        return self.journal.run_id

    # ---- the run
    def start(
        self, run_name: str, params: dict[str, str], tags: dict[str, str], resume_run_id: str | None
    ) -> None:
        """Note what the run is and return at once: the flusher creates (or adopts) the run before it
        sends anything, so a slow or unreachable store delays the run's records, not its training."""
        self._opening = _Opening(run_name, dict(params), dict(tags), resume_run_id, self.journal.last_seq)
        self._flusher = threading.Thread(target=self._flush_loop, name="mlflow-flusher", daemon=True)
        self._flusher.start()

    def _open(self, opening: _Opening) -> None:
        """Create or adopt the run, then journal its params and tags; safe to repeat after a failure. On
        adoption the params are sent again (only those the store lacks: an attempt that died before its
        params were stored leaves no run without them, and a changed node id is no conflict)."""
        from midasbench.harness.tracking import ensure_experiment

        experiment_id = ensure_experiment(self.uri, self.experiment)
        tags, params = opening.tags, opening.params
        adopted = opening.resume_run_id or self.run_id or self._find_run(experiment_id, tags)
        if adopted is None:
            run_id = self._create_run(experiment_id, opening.run_name, tags)
        else:
            run_id = adopted
            self.client.update_run(adopted, status="RUNNING")
            tags = {**tags, "midasbench.resumed": "true"}
            stored = self.client.get_run(adopted).data.params
            params = {k: v for k, v in params.items() if k not in stored}
        # an earlier attempt's unsent params and status (its journal was adopted): this one sends the
        # params it was given and ends the run itself
        self.journal.drop_pending("params", upto=opening.earlier_seq)
        self.journal.drop_pending("end", upto=opening.earlier_seq)
        self.journal.acknowledge(self.journal.acked, run_id)
        self._append_chunked("params", params, MAX_PARAMS)
        self._append_chunked("tags", {**tags, RUN_KEY_TAG: self.journal.run_key}, MAX_TAGS)

    def _find_run(self, experiment_id: str, tags: Mapping[str, str]) -> str | None:
        """An unfinished run this one continues: the one an earlier try of this journal created, or an
        earlier attempt of the same sweep trial (same parent run and trial key)."""
        found = self._runs_with_key(experiment_id)
        if found:
            return found[0]
        parent, trial = tags.get("mlflow.parentRunId"), tags.get(IDENTITY_TAG)
        if not parent or not trial:
            return None
        found = self._search(
            experiment_id,
            f"tags.mlflow.parentRunId = '{parent}' and tags.`{IDENTITY_TAG}` = '{trial}' "
            "and attributes.status != 'FINISHED'",
        )
        return found[0] if found else None

    def _runs_with_key(self, experiment_id: str) -> list[str]:
        """Runs carrying this journal's run key, earliest first."""
        return self._search(experiment_id, f"tags.`{RUN_KEY_TAG}` = '{self.journal.run_key}'")

    def _search(self, experiment_id: str, query: str) -> list[str]:
        runs = self.client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"])
        return [run.info.run_id for run in runs]

    def _create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str:
        """A new run (``_find_run`` found none with this journal's key; a try whose answer was lost is
        found by it when ``_open`` is repeated); runs the HTTP layer re-sent are deleted but the earliest."""
        self.client.create_run(
            experiment_id, run_name=run_name, tags={**tags, RUN_KEY_TAG: self.journal.run_key}
        )
        existing = self._runs_with_key(experiment_id)
        for duplicate in existing[1:]:
            self.client.delete_run(duplicate)
        return existing[0]

    # ---- records: journaled, sent in the background
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        self._append("metrics", {"step": step, "timestamp": int(time.time() * 1000), "values": values})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._append("text", {"artifact_file": artifact_file, "text": text})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._append_chunked("tags", {k: str(v) for k, v in tags.items()}, MAX_TAGS)

    def _append_chunked(self, op: str, items: dict[str, str], size: int) -> None:
        keys = list(items)
        for start in range(0, len(keys), size):
            self._append(op, {k: items[k] for k in keys[start : start + size]})

    def _append(self, op: str, data: dict[str, Any]) -> None:
        if self._fatal is not None:
            raise self._store_error("refused a record", self._fatal)
        self.journal.append(op, data)
        self._wake.set()

    def end(self, status: str) -> None:
        """Journal the status, then wait until the store holds everything (at most ``flush_timeout_s``);
        a ``TrackingError`` naming the store when it does not."""
        if self._flusher is None and self.run_id is None:  # never started: nothing to end
            return
        self.journal.append("end", {"status": status})
        self._deadline = time.monotonic() + self.flush_timeout_s
        self._closing.set()
        self._wake.set()
        if self._flusher is not None:
            self._flusher.join()
        else:  # start() never ran its flusher: send from here
            self._flush_loop()
        left = self.journal.pending()
        if self._fatal is not None or left or self._opening is not None:
            cause = self._fatal or self._last_error
            raise self._store_error(
                f"did not store {len(left)} records within {self.flush_timeout_s:g} s", cause
            )

    def _store_error(self, what: str, cause: BaseException | None) -> TrackingError:
        return TrackingError(
            f"MLflow tracking store {self.uri} {what} of run {self.run_id or '(not created yet)'}"
            + (f" (last error: {type(cause).__name__}: {str(cause)[:300]})" if cause else "")
            + f"; they are kept in {self.journal.path or 'memory'} and sent by the run's next attempt"
        )

    # ---- the flusher
    def _flush_loop(self) -> None:
        delays = backoff_delays()
        while True:
            opening = self._opening
            pending = self.journal.pending()
            if opening is None and not pending:
                if self._closing.is_set():
                    return
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                if opening is not None:
                    self._open(opening)
                    self._opening = None
                else:
                    self._send(pending)
                delays = backoff_delays()
            except Exception as exc:
                if not is_transient(exc):
                    self._fatal = exc
                    return
                self._last_error = exc
                delay = next(delays)
                if time.monotonic() + delay > self._deadline:
                    return
                time.sleep(delay)

    def _send(self, pending: list[Entry]) -> None:
        """The first group of pending entries in one call, then acknowledged: consecutive params, tags
        and metrics in one ``log_batch`` (within MLflow's limits), a text or the end on its own."""
        first = pending[0]
        if first.op in ("text", "end"):
            if first.op == "text":
                self.client.log_text(self.run_id, first.data["text"], first.data["artifact_file"])
            else:
                self.client.set_terminated(self.run_id, status=first.data["status"])
            self.journal.acknowledge(first.seq)
            return
        batch = _Batch()
        last = first.seq
        for entry in pending:
            if not batch.takes(entry):
                break
            batch.add(entry)
            last = entry.seq
        self.client.log_batch(self.run_id, **batch.arguments())
        self.journal.acknowledge(last)


@dataclass(frozen=True)
class _Opening:
    """What ``start`` was given; ``earlier_seq``: the last journal entry of earlier attempts."""

    run_name: str
    params: dict[str, str]
    tags: dict[str, str]
    resume_run_id: str | None
    earlier_seq: int


class _Batch:
    """Params, tags and metrics of consecutive journal entries, for one ``log_batch``."""

    def __init__(self) -> None:
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.metrics: list[tuple[str, float, int, int]] = []

    def takes(self, entry: Entry) -> bool:
        if entry.op == "params":
            return len(self.params) + len(entry.data) <= MAX_PARAMS or not self._size()
        if entry.op == "tags":
            return len(self.tags) + len(entry.data) <= MAX_TAGS or not self._size()
        if entry.op == "metrics":
            return self._size() + len(entry.data["values"]) <= MAX_METRICS or not self._size()
        return False

    def _size(self) -> int:
        return len(self.params) + len(self.tags) + len(self.metrics)

    def add(self, entry: Entry) -> None:
        if entry.op == "params":
            self.params.update(entry.data)
        elif entry.op == "tags":
            self.tags.update(entry.data)
        else:
            d = entry.data
            self.metrics += [(k, v, d["timestamp"], d["step"]) for k, v in d["values"].items()]

    def arguments(self) -> dict[str, list]:
        """``log_batch`` keyword arguments (entries are appended at most one call's limit each)."""
        from mlflow.entities import Metric, Param, RunTag

        return {
            "params": [Param(k, v) for k, v in self.params.items()],
            "tags": [RunTag(k, v) for k, v in self.tags.items()],
            "metrics": [Metric(k, v, ts, step) for k, v, ts, step in self.metrics],
        }
