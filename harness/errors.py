"""Error types that the CLI turns into clear messages and exit codes."""


class ConfigError(ValueError):
    """A configuration key, type or value is wrong; the message names the key and what is allowed."""


class TrackingError(RuntimeError):
    """A run's records could not be stored in its tracking store (the message names the store)."""


class RunStopped(Exception):
    """The run was stopped from outside at an epoch's end (a sweep's scheduler or an interrupted sweep):
    not a failure; the run ends KILLED. Whoever stopped it records why (the sweep tags early-stopped
    runs): a late KILLED from the run agrees with it, where a FAILED would overrule it."""
