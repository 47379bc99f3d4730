"""The Prefect API a command talks to: the configured one, or a temporary server that dies with us.

With no ``PREFECT_API_URL``, Prefect starts a temporary API server in a
child process on first use and stops it at exit (``atexit``). A ``stylize``
process killed with SIGKILL runs no exit handler, so that server outlived it.
``ensure_api`` starts the same server (``uvicorn`` on Prefect's app
factory, as Prefect does) itself, with the Linux parent-death signal set.

Why PR_SET_PDEATHSIG: the kernel delivers the signal when our process dies,
however it dies (SIGKILL, OOM killer), with nothing of ours left to run, and
the server needs no code of its own to watch for it. The alternatives need a
survivor: a process group or session killed by our exit handler (which
SIGKILL skips), or a helper that watches a pipe from us (one more process,
and a wrapper around uvicorn). Its caveats, handled here: the signal follows
the *thread* that forked the child, so the server is started from the main
thread, which lives as long as the process; and a parent that died before
``prctl`` took effect is caught by comparing ``getppid`` afterwards. Outside
Linux the server starts without it (Prefect's own behaviour).
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from stylize.errors import PrefectApiError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def ensure_api(*, startup_timeout: float | None = None) -> str | None:
    """Make sure this process has a Prefect API. Returns the URL of a temporary server started
    here for the rest of the process (it dies with the process, even by SIGKILL), or None
    when one is configured (``PREFECT_API_URL``: the environment, a profile, a test harness).

    The server is stopped at exit, after Prefect's log and event workers (registered later,
    so run earlier) have sent what they hold."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if PREFECT_API_URL.value():
        return None
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("ensure_api: start the server from the main thread (PR_SET_PDEATHSIG "
                           "follows the thread that forks it)")
    # Wall-clock seconds, at least a minute: Prefect's own wait counts only its sleeps, and a fresh
    # database's migrations on a busy machine took more than its 20 s default here.
    timeout = startup_timeout or max(60.0, float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    process, url = _start_server(timeout)
    atexit.register(_stop, process)
    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()  # every thread's settings, not just this context's
    return url


def _start_server(timeout: float) -> tuple[subprocess.Popen, str]:
    """Start uvicorn on Prefect's app on a free loopback port; wait until /api/health answers."""
    app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    for _ in range(3):  # another process may take the port between our probe and uvicorn's bind
        port = _free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent(os.getpid()),
        )
        url = f"http://127.0.0.1:{port}/api"
        if _wait_healthy(process, url, timeout):
            log.debug("temporary Prefect API at %s (pid %d)", url, process.pid)
            return process, url
        if process.poll() is None:
            _stop(process)
            break
    raise PrefectApiError(f"the temporary Prefect API server did not answer within {timeout:.0f} s "
                          f"(exit code {process.returncode}); set PREFECT_API_URL to a running server "
                          "(`prefect server start`)")


def _die_with_parent(parent: int):
    """A preexec function: the child gets SIGKILL when ``parent`` dies (Linux), see the module doc."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl  # resolved before fork

    def preexec() -> None:
        # SIGKILL rather than SIGTERM: nothing of the server's is worth a graceful end that
        # might not come (its SQLite database is transactional), and it must not survive us.
        if prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:  # the parent died before prctl: the signal will never come
            os._exit(126)

    return preexec


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_healthy(process: subprocess.Popen, url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
