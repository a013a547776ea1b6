"""SIGTERM raised as an exception while an output is written, so the partial output is removed."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(BaseException):
    """SIGTERM, raised as an exception while an atomic directory is being written, so it is cleaned up."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block (main thread only), SIGTERM raises :class:`Terminated` instead of killing.

    SIGINT already raises KeyboardInterrupt. The previous handler is restored on exit; a SIGTERM
    that arrives then still ends the process, with the exit status a default SIGTERM gives (143).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # signal handler signature
        raise Terminated("partial output removed")  # atomic_file / atomic_directory remove it on the way out

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
