"""The one exception type a user sees: a refused configuration or input."""
import argparse


class ConfigError(ValueError):
    """A bad configuration or input, reported to the user as one line before any work starts."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one-line ConfigErrors (exit code 2 through the CLI)."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message}")
