"""The one exception type a user sees: a refused configuration or input."""


class ConfigError(ValueError):
    """A bad configuration or input, reported to the user as one line before any work starts."""
