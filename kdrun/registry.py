"""A small generic registry: models, methods and datasets are all looked up by name through it."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Generic, TypeVar

from kdrun.errors import ConfigError

T = TypeVar("T")


def first_doc_line(obj) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


class Registry(Generic[T]):
    """Maps names to objects; registering a name twice is an error, unknown names suggest close matches."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}

    def register(self, name: str, description: str | None = None) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            self._descriptions[name] = description if description is not None else first_doc_line(obj)
            return obj

        return decorate

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: str, key: str | None = None) -> str:
        close = difflib.get_close_matches(str(name), self._entries, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = f"{key}={name}" if key else f"'{name}'"
        return f"unknown {self.kind} {where}{hint} (known: {', '.join(self.names())})"

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def describe(self, name: str) -> str:
        return self._descriptions[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
