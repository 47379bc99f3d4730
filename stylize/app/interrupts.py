"""Ctrl+C and SIGTERM for the long-running commands (``run``, ``watch``): stop, and end in time.

On SIGINT the main thread gets ``KeyboardInterrupt``, on SIGTERM ``Terminated``,
so a run unwinds the same way for both: the catalog flow sets its stop event,
running jobs stop at their next iteration, and no storage attempt (botocore
retry, Prefect task retry, including a write task's) starts after it.

Unwinding can still wait on a request that is already on the wire: Prefect's
task runner and Python's exit both join the worker threads, and a stalled S3
PUT holds its thread for its whole read timeout (60 s by default), then
botocore's retries. So a watchdog, armed by the first signal, ends the process
``EXIT_DEADLINE`` seconds later if it is still alive, after running the
``last_rites`` callbacks (the watcher frees the idempotency key of its
unfinished run there). As soon as it hears the signal it calls the ``at_once``
callbacks (the catalog flow's ``stop_runs``): the main thread may take a while
to unwind to the flow's own ``stop.set()``, and the jobs' threads must send
nothing to storage meanwhile. It hears the signal through ``signal.set_wakeup_fd``,
which the interpreter writes to whichever Python-level handler runs: during a
flow run Prefect installs its own SIGTERM handler, so ours would not see it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from typing import Callable, Iterable, Iterator

log = logging.getLogger(__name__)

#: Seconds from the first Ctrl+C or SIGTERM to the forced end of the process (under the
#: 10 s promised, with room for a loaded machine to get the process scheduled).
EXIT_DEADLINE = 6.0
_WATCHED = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a run unwinds as it does on Ctrl+C."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def bounded_interrupts(*, deadline: float = EXIT_DEADLINE,
                       at_once: Iterable[Callable[[], None]] = (),
                       last_rites: Iterable[Callable[[], None]] = ()) -> Iterator[None]:
    """Within: SIGTERM raises ``Terminated`` (exit 143 instead of dying at once), and the first
    SIGINT or SIGTERM calls each of ``at_once`` (from another thread) and arms a watchdog that
    ends the process ``deadline`` seconds later (exit 130 or 143), after calling each of
    ``last_rites``. Leaving the block normally disarms it;
    after a signal it stays armed, as the interpreter's exit may wait on a hung thread too.
    Outside the main thread (where signals cannot be handled) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    heard, wakeup = socket.socketpair()
    wakeup.setblocking(False)  # set_wakeup_fd requires it
    previous_fd = signal.set_wakeup_fd(wakeup.fileno(), warn_on_full_buffer=False)
    previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
    watchdog = threading.Thread(target=_watch, args=(heard, deadline, tuple(at_once), tuple(last_rites)),
                                name="stylize-interrupt-watchdog", daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.set_wakeup_fd(previous_fd)
        # The watchdog reads what is left (a signal that came just now still arms it), then the
        # end of the stream, and goes. Not joined: an armed one must outlive this block.
        wakeup.close()


def _call_each(callbacks: tuple[Callable[[], None], ...]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # the process is ending anyway; say what could not be done
            log.warning("while ending the process: %s failed", getattr(callback, "__name__", callback),
                        exc_info=True)


def _watch(heard: socket.socket, deadline: float, at_once: tuple[Callable[[], None], ...],
           last_rites: tuple[Callable[[], None], ...]) -> None:
    # Not a thread the kernel may hand the signal to: the main thread must get it, and raise.
    if hasattr(signal, "pthread_sigmask"):  # POSIX
        signal.pthread_sigmask(signal.SIG_BLOCK, set(_WATCHED))
    while True:
        try:
            data = heard.recv(64)
        except OSError:
            data = b""
        if not data:  # the block was left without a signal
            heard.close()
            return
        signals = [s for s in data if s in _WATCHED]
        if signals:
            break
    # ``heard`` stays open: while the block lasts, later signals still write to its peer.
    _call_each(at_once)
    # Sleep on an event nobody sets: a plain wait that ends at the deadline.
    threading.Event().wait(deadline)
    _call_each(last_rites)
    # Through logging like every other line (the CLI's handler, else logging's last resort: stderr).
    log.error("stylize: still running %.0f s after the interrupt (a storage request that does not answer?); "
              "exiting without waiting for it", deadline)
    os._exit(_WATCHED[signals[0]])
