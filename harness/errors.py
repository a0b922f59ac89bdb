"""Error types that the CLI turns into clear messages and exit codes."""


class ConfigError(ValueError):
    """A configuration key, type or value is wrong; the message names the key and what is allowed."""


class TrackingError(RuntimeError):
    """A run's records could not be stored in its tracking store (the message names the store)."""
