"""Crash a training run after a chosen epoch, as a failing machine would, for the resume tests."""

from __future__ import annotations


class Crash(RuntimeError):
    pass


def crash_after(epoch: int):
    """An epoch callback that raises ``Crash`` once epoch ``epoch`` is checkpointed."""

    def callback(e, metrics, directory):
        if e == epoch:
            raise Crash

    return callback
