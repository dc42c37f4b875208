"""Ctrl-C that waits for the file being written.

A KeyboardInterrupt raised inside ``torch.save`` leaves its zip writer half
closed, and the writer then raises a RuntimeError of its own on the way out:
the user saw a traceback instead of "interrupted; the last checkpoint is ...".
Writing a checkpoint takes a fraction of a second, so the interrupt is held
until the file is complete and raised right after: the user keeps that
checkpoint too.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT for the duration of the block, then raise KeyboardInterrupt if one came.

    Only the main thread can install signal handlers; elsewhere (and where a
    caller installed its own handler) the block runs unchanged.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
