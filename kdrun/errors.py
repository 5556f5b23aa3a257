"""The exception types a user sees as one line: a refused configuration or input, and a failed write."""
import argparse


class ConfigError(ValueError):
    """A bad configuration or input, reported to the user as one line before any work starts."""


class OutputError(OSError):
    """A file could not be written (results_dir is a file, read-only or full); the message names the path and
    the cause in words. `errno` is kept; str() is the message alone, without `[Errno 28]`."""

    def __init__(self, err: int | None, message: str):
        super().__init__(err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class DamagedFile(ConfigError):
    """A checkpoint that cannot be trusted: unreadable, truncated, or not the bytes its sha256 file records."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path} is damaged: {reason}")
        self.path, self.reason = path, reason


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one-line ConfigErrors (exit code 2 through the CLI)."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message}")


class RunError(RuntimeError):
    """A run that started but cannot go on (e.g. a cached teacher that does not match its record): one line,
    exit status 1."""
