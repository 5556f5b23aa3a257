"""Ending a run cleanly on SIGTERM (what SLURM sends before it kills a job) and SIGINT (Ctrl-C).

The first signal only sets a flag; the training loop checks it after every step (`check_stop`) and raises
`Interrupted`, so the run stops between two steps with its last epoch checkpoint intact and records
`status: interrupted`. A second Ctrl-C stops at once. A signal that already has a handler of its own (the
submitit launcher bypasses SIGTERM and requeues on SIGUSR2) is left to it.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from kdrun.progress import print_error

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: str | None = None


class Interrupted(Exception):
    """The run was asked to stop by a signal; its checkpoint allows it to resume."""


def stop_requested() -> str | None:
    return _requested


def check_stop() -> None:
    if _requested is not None:
        raise Interrupted(f"stopped by {_requested}")


def _on_signal(signum, frame) -> None:
    global _requested
    name = signal.Signals(signum).name
    if _requested is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now
    _requested = name
    print_error("kdrun:", f"{name} received: stopping after this step (the run can be resumed)"
                + ("; press Ctrl-C again to stop now" if signum == signal.SIGINT else ""))


def _is_default(handler) -> bool:
    return handler in (signal.SIG_DFL, signal.default_int_handler, None)


@contextmanager
def stop_on_signals():
    """Install the flag-setting handlers for the duration of a run (main thread only; a joblib worker
    thread or a launcher with its own handlers keeps what it has)."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    installed = [sig for sig, handler in previous.items() if _is_default(handler)]
    for sig in installed:
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig in installed:
            signal.signal(sig, previous[sig])


def request(name: str) -> None:
    """Record a stop that arrived outside the handlers (a Ctrl-C before they were installed)."""
    global _requested
    _requested = _requested or name
