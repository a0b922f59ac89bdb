"""Which tracking failures are worth another try, and the backoff between tries.

A saturated or restarting MLflow server answers in ways its client does not retry: a database pool
timeout comes back as HTTP 400 (``QueuePool limit ... connection timed out``), a dropped connection as
``IncompleteRead``, a server that is down as a refused connection. All of these pass; a request the
server understood and refused (a param changed its value, a run that does not exist) does not.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator

TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "RESOURCE_EXHAUSTED",
}
TRANSIENT_TEXT = (
    "QueuePool limit",
    "timed out",
    "timeout",
    "database is locked",
    "Connection",
    "connection",
    "Max retries exceeded",
    "502",
    "503",
    "504",
)


def is_transient(exc: BaseException) -> bool:
    """True for a failure that another try may not meet (see the module docstring)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_CODES or any(text in str(exc) for text in TRANSIENT_TEXT)
    return isinstance(
        exc, OSError | http.client.HTTPException | TimeoutError
    )  # requests' errors are OSErrors


def backoff_delays(first: float = 0.5, cap: float = 30.0) -> Iterator[float]:
    """0.5, 1, 2, … seconds, at most ``cap``: a restarting server gets time, a brief blip little."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)
