"""Issue 14: a tracker that never loses a record and never takes a run down with its store.

A real sqlite MLflow store (one per module: its schema takes seconds) behind a proxy client that fails
chosen calls the way a saturated or restarting server does.
"""

import http.client
import json
import os
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from midasbench.harness.errors import TrackingError
from midasbench.harness.tracking import RUN_KEY_TAG, MlflowTracker
from midasbench.harness.tracking.journal import ACK_FILE, JOURNAL_FILE, Journal, JournalError
from midasbench.harness.tracking.retry import is_transient
from midasbench.harness.training.trainer import train

POOL_TIMEOUT = RestException(
    {
        "error_code": "BAD_REQUEST",
        "message": "QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00",
    }
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # the schema, once
    return uri


class Flaky:
    """An MlflowClient whose chosen methods fail: ``fail[name] = n`` raises ``error`` on the next n calls
    (``after=True``: the call is made first and its answer lost, as when a connection drops)."""

    def __init__(self, client: MlflowClient, error: Exception = POOL_TIMEOUT) -> None:
        self.client, self.error = client, error
        self.fail: dict[str, int] = {}
        self.after: set[str] = set()
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str):
        real = getattr(self.client, name)

        def call(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.fail.get(name, 0) > 0:
                self.fail[name] -= 1
                if name in self.after:
                    real(*args, **kwargs)
                raise self.error
            return real(*args, **kwargs)

        return call


def tracker(store: str, experiment: str, folder: Path | None, **kwargs) -> MlflowTracker:
    made = MlflowTracker(store, experiment, folder, "fp", **kwargs)
    made.client = Flaky(made.client)
    return made


def fast_backoff(monkeypatch):
    import midasbench.harness.tracking.mlflow_tracker as module

    monkeypatch.setattr(module, "backoff_delays", lambda: iter([0.01] * 10_000))


def runs(store: str, experiment: str):
    client = MlflowClient(store)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


# ------------------------------------------------------------------------------------------ journal


def test_journal_survives_a_torn_last_line_and_names_a_corrupt_one(tmp_path):
    journal = Journal.open(tmp_path, "fp")
    journal.append("metrics", {"step": 0, "timestamp": 1, "values": {"a": 1.0}})
    journal.append("tags", {"t": "x"})
    journal.acknowledge(1, "run-1")
    with open(tmp_path / JOURNAL_FILE, "a") as handle:
        handle.write('{"seq": 3, "op": "metr')  # the process died while writing
    again = Journal.open(tmp_path, "fp")
    assert (again.run_id, again.acked, again.run_key) == ("run-1", 1, journal.run_key)
    assert [(e.seq, e.op) for e in again.pending()] == [(2, "tags")]
    lines = (tmp_path / JOURNAL_FILE).read_text().splitlines()
    (tmp_path / JOURNAL_FILE).write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(JournalError, match=rf"{JOURNAL_FILE}: line 2 is not a journal entry"):
        Journal.open(tmp_path, "fp")


def test_a_journal_of_another_config_or_an_ended_run_is_not_adopted(tmp_path):
    first = Journal.open(tmp_path, "fp")
    first.append("tags", {"t": "x"})
    assert Journal.open(tmp_path, "other").pending() == []  # another config: a fresh journal
    assert list(tmp_path.glob(f"{JOURNAL_FILE}.*.superseded"))  # the old one kept beside
    ended = Journal.open(tmp_path, "fp")
    seq = ended.append("end", {"status": "FINISHED"})
    ended.acknowledge(seq, "run-2")
    assert Journal.open(tmp_path, "fp").run_id is None  # ended: the next run starts its own
    assert not Journal.open(tmp_path, "fp", adopt=False).entries


def test_which_failures_are_retried():
    assert is_transient(POOL_TIMEOUT)  # HTTP 400 from the server's pool: MLflow's client gives up on it
    assert is_transient(http.client.IncompleteRead(b""))
    assert is_transient(ConnectionRefusedError())
    assert is_transient(MlflowException("boom", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_transient(
        MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)
    )
    assert not is_transient(KeyError("MLFLOW_TRACKING_URI"))
    assert (
        os.environ.get("MLFLOW_DISABLE_TELEMETRY") == "true"
    )  # the telemetry thread's KeyError, at the source


# ------------------------------------------------------------------------------------------ tracker


def test_a_saturated_store_delays_logging_and_loses_nothing(store, tmp_path, monkeypatch):
    fast_backoff(monkeypatch)
    t = tracker(store, "saturated", tmp_path)
    t.client.fail = {"log_batch": 5, "log_text": 2}
    t.start("r", {"p": "1"}, {"k": "v"}, None)
    for step in range(4):
        t.log_metrics({"loss": 1.0 / (step + 1), "nan": float("nan")}, step)  # returns at once
    t.log_text("hello", "note.txt")
    t.end("FINISHED")
    (run,) = runs(store, "saturated")
    assert run.info.status == "FINISHED" and run.data.params == {"p": "1"} and run.data.tags["k"] == "v"
    history = MlflowClient(store).get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2, 3]  # each row once, though batches were sent again
    assert "nan" not in run.data.metrics
    assert (
        t.journal.pending() == []
        and json.loads((tmp_path / ACK_FILE).read_text())["run_id"] == run.info.run_id
    )


def test_an_unreachable_store_delays_the_run_not_its_training(store, tmp_path, monkeypatch):
    # "a slow or unreachable server delays logging, not training": start and every record return while
    # the store answers nothing, not even the run's creation; the attempt fails at its end naming the
    # store, and the next attempt sends everything, the first one's records too, into one run
    fast_backoff(monkeypatch)
    first = tracker(store, "unreachable", tmp_path, flush_timeout_s=0.05)
    first.client.fail = {"search_runs": 10**6, "create_run": 10**6}
    first.start("r", {"lr": "0.1", "node": "a"}, {"k": "v"}, None)
    for step in range(3):
        first.log_metrics({"loss": 1.0 / (step + 1)}, step)
    assert first.run_id is None  # every record taken, and there is no run yet
    with pytest.raises(TrackingError, match=r"of run \(not created yet\).*kept in .*tracking.jsonl"):
        first.end("FAILED")
    second = tracker(store, "unreachable", tmp_path)
    second.start("r", {"lr": "0.1", "node": "b"}, {"k": "v"}, None)  # another node: not a changed param
    second.log_metrics({"loss": 0.2}, 3)
    second.end("FINISHED")
    (run,) = runs(store, "unreachable")
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1", "node": "b"}
    history = MlflowClient(store).get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2, 3]


def test_params_are_stored_when_a_crashed_attempt_is_adopted(store, tmp_path, monkeypatch):
    # the defect: a params batch failed inside start, the retried trial adopted the run and never logged
    # them: a FINISHED run with 0 params. Now the attempt's journal holds them and the next one sends them.
    fast_backoff(monkeypatch)
    tags = {"mlflow.parentRunId": "parent-1", "midasbench.trial": "t-1"}
    first = tracker(store, "adopt", tmp_path, flush_timeout_s=0.05)
    first.client.fail = {"log_batch": 10**6}  # the store takes no batch: the attempt dies with nothing sent
    first.start("r", {"lr": "0.1", "seed": "0"}, tags, None)
    first.log_metrics({"loss": 2.0}, 0)
    with pytest.raises(TrackingError, match=r"did not store \d+ records .* kept in .*tracking.jsonl"):
        first.end("FAILED")
    second = tracker(store, "adopt", tmp_path)  # the retried attempt, same checkpoint folder
    second.start("r", {"lr": "0.1", "seed": "0"}, tags, None)
    second.log_metrics({"loss": 1.0}, 1)
    second.end("FINISHED")
    (run,) = runs(store, "adopt")
    assert run.info.run_id == second.run_id == first.run_id
    assert run.data.params == {"lr": "0.1", "seed": "0"} and run.info.status == "FINISHED"
    assert [m.step for m in MlflowClient(store).get_metric_history(run.info.run_id, "loss")] == [0, 1]
    assert run.data.tags["midasbench.resumed"] == "true"


def test_run_creation_whose_answer_was_lost_makes_one_run(store, tmp_path, monkeypatch):
    fast_backoff(monkeypatch)
    t = tracker(store, "lost-answer", tmp_path)
    t.client.error = http.client.IncompleteRead(b"")
    t.client.fail, t.client.after = {"create_run": 2}, {"create_run"}  # created, then the connection dropped
    t.start("r", {}, {}, None)
    t.end("FINISHED")
    (run,) = runs(store, "lost-answer")
    assert run.data.tags[RUN_KEY_TAG] == t.journal.run_key and t.client.calls["create_run"] == 1


def test_runs_created_twice_by_the_http_layer_are_deleted_but_one(store, tmp_path):
    t = tracker(store, "resent", tmp_path)
    real_create = t.client.client.create_run

    def create_twice(*args, **kwargs):  # the HTTP library re-sent a create that was already committed
        real_create(*args, **kwargs)
        return real_create(*args, **kwargs)

    t.client.client.create_run = create_twice
    t.start("r", {"p": "1"}, {}, None)
    t.end("FINISHED")
    (run,) = runs(store, "resent")  # active runs only: the duplicate was deleted
    assert run.info.run_id == t.run_id and run.data.params == {"p": "1"}


def test_a_refused_record_fails_the_run_with_the_store_named(store, tmp_path):
    t = tracker(store, "refused", tmp_path)
    t.start("r", {"p": "1"}, {}, None)
    t.journal.append("params", {"p": "2"})  # a param changing its value: the store refuses it, for good
    with pytest.raises(
        TrackingError, match=rf"MLflow tracking store {store} .*INVALID_PARAMETER_VALUE|Changing"
    ):
        t.end("FINISHED")


# ------------------------------------------------------------------------------------------ in a run


def test_a_run_makes_one_batched_call_per_epoch(tiny_config, store, monkeypatch):
    made = []

    def counting(*args, **kwargs):
        made.append(MlflowTracker(*args, **kwargs))
        made[-1].client = Flaky(made[-1].client)
        return made[-1]

    monkeypatch.setattr("midasbench.harness.training.trainer.MlflowTracker", counting)
    cfg = tiny_config("tracking.enabled=true", f"tracking.uri={store}", "tracking.experiment=calls")
    result = train(cfg)  # 3 epochs
    calls = made[0].client.calls
    params = len(MlflowClient(store).get_run(result.run_id).data.params)
    # params and tags once (at most 100 a call), a metrics batch per epoch and the final metrics; fewer when
    # the flusher found several entries waiting
    assert calls["log_batch"] <= -(-params // 100) + 1 + 3 + 1
    assert calls["log_text"] == 3 and calls["set_terminated"] == 1
    assert MlflowClient(store).get_run(result.run_id).info.status == "FINISHED"


def test_the_first_error_is_not_hidden_by_a_failing_end(tiny_config, store, monkeypatch, capsys):
    def broken_end(self, status):
        raise TrackingError("store gone")

    monkeypatch.setattr(MlflowTracker, "end", broken_end)
    cfg = tiny_config("tracking.enabled=true", f"tracking.uri={store}", "tracking.experiment=first-error")

    def crash(epoch, metrics, checkpoint_dir):
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        train(cfg, callbacks=[crash])
    assert "tracking could not end the run after the error below: store gone" in capsys.readouterr().err
