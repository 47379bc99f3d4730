"""Fault injection for tests: a misbehaving HTTP proxy in front of the S3 test server,
and ``stylize run`` as a child process that a test can kill.

``FaultProxy`` forwards requests to the upstream server and, for requests it
matches (method, path pattern, fault budget), fails them at a seeded ``rate``
with one of ``kinds`` (default: the ``TRANSIENT`` ones):

* ``reset``: the connection is reset before the request is forwarded;
* ``stall``: no answer until ``stall_seconds`` pass (or the proxy closes), then a reset;
* ``500``: S3's ``InternalError``; ``503``: S3's ``SlowDown``; ``403``: ``AccessDenied``;
* ``truncate``: the request is forwarded, then the answer ends after half its
  body (its Content-Length says the full size) and the connection is closed
  cleanly, so only the length tells; an answer without a body is reset
  instead, after the upstream has acted on the request.

Every injected fault is recorded in ``faults`` as ``(kind, method, path)``, so
a test can wait for one (``wait_for_fault``) and then, say, kill the client.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TRANSIENT = ("reset", "stall", "500", "503", "truncate")
KINDS = (*TRANSIENT, "403")
_ERRORS = {
    "403": (403, b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"),
    "500": (500, b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"),
    "503": (503, b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that injects faults; a context manager."""

    def __init__(self, upstream: str, *, rate: float = 1.0, kinds: tuple[str, ...] = TRANSIENT, seed: int = 0,
                 methods: tuple[str, ...] = ("GET", "PUT", "HEAD", "POST", "DELETE"), path: str | None = None,
                 limit: int | None = None, stall_seconds: float = 30.0, after: int = 0):
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        self.upstream = upstream.removeprefix("http://")
        self.rate, self.kinds, self.methods, self.limit = rate, tuple(kinds), tuple(methods), limit
        self.path = re.compile(path) if path else None
        self.stall_seconds = stall_seconds
        self.after = after  # matching requests forwarded untouched before faults may start
        self.faults: list[tuple[str, str, str]] = []
        self.requests = 0
        self.seen: list[tuple[float, str, str]] = []  # (time.monotonic(), method, path) of every request
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._faulted = threading.Condition(self._lock)
        self._closing = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self._body()
                kind = proxy._choose(self.command, self.path)
                if kind in _ERRORS:
                    status, payload = _ERRORS[kind]
                    self._reply(status, [("Content-Type", "application/xml")], payload)
                elif kind in ("reset", "stall"):
                    if kind == "stall":
                        proxy._closing.wait(proxy.stall_seconds)
                    self._reset()
                else:
                    status, headers, data = proxy._forward(self.command, self.path, self.headers, body)
                    if kind == "truncate" and data and self.command != "HEAD":
                        self._reply(status, headers, data[: len(data) // 2], length=len(data))
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_WR)  # a clean end, too early
                    elif kind == "truncate":
                        self._reset()
                    else:
                        self._reply(status, headers, data)

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def _reply(self, status, headers, data: bytes, *, length: int | None = None):
                self.send_response(status)
                for k, v in headers:
                    if k.lower() != "content-length" or self.command == "HEAD":  # HEAD: the object's size
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data) if length is None else length))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                self.wfile.flush()

            def _reset(self):
                # SO_LINGER 0: close() sends RST, as a crashed server or a middlebox would.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a reset connection is the point, not news

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _choose(self, method: str, path: str) -> str | None:
        """The fault for this request, or None to forward it untouched."""
        with self._lock:
            self.requests += 1
            self.seen.append((time.monotonic(), method, path))
            if method not in self.methods or (self.path is not None and not self.path.search(path)):
                return None
            if self.limit is not None and len(self.faults) >= self.limit:
                return None
            if self.after > 0:
                self.after -= 1
                return None
            if self._random.random() >= self.rate:
                return None
            kind = self._random.choice(self.kinds)
            self.faults.append((kind, method, path))
            self._faulted.notify_all()
            return kind

    def _forward(self, method: str, path: str, headers, body: bytes | None):
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in ("host", "transfer-encoding")}
            if body is not None:
                sent["Content-Length"] = str(len(body))
            sent["Host"] = self.upstream
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            data = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            return response.status, kept, data
        finally:
            conn.close()

    def wait_for_fault(self, count: int = 1, timeout: float = 60.0) -> list[tuple[str, str, str]]:
        """Block until ``count`` faults have been injected; returns them (AssertionError on timeout)."""
        with self._faulted:
            if not self._faulted.wait_for(lambda: len(self.faults) >= count, timeout):
                raise AssertionError(f"no fault injected in {timeout} s ({self.requests} requests seen)")
            return list(self.faults)

    def close(self) -> None:
        """Stop serving; stalled requests end with a reset."""
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- stylize run as a child process -------------------------------------------


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment for a ``stylize run`` child: its own PREFECT_HOME, no telemetry, and the
    test session's Prefect API (so the child does not start a server of its own)."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    if PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    env.update(extra)
    return env


def start_run(manifest: Path | str, env: dict[str, str], *args: str, log: Path | None = None) -> subprocess.Popen:
    """Start ``stylize run MANIFEST --quiet ARGS`` in a child process (stdout and stderr to ``log``)."""
    out = open(log, "wb") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "stylize.app.cli", "run", str(manifest), "--quiet", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    finally:
        if log is not None:
            out.close()


def kill(process: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 60.0) -> float:
    """Send ``sig`` and wait for the process to end; returns the seconds it took."""
    started = time.monotonic()
    process.send_signal(sig)
    process.wait(timeout)
    return time.monotonic() - started


def interrupt(process: subprocess.Popen, sig: int, proxy: FaultProxy, log: Path, on_the_wire: int = 0) -> None:
    """Send ``sig``; the process must end within 10 s with 128 + sig, without a traceback, starting
    no request to storage after the signal.

    Up to ``on_the_wire`` requests may reach the proxy just after the signal, where the process
    sends them all the time: they left before it (the proxy records when they arrive); one sent
    after it would not be alone, nor arrive within the second."""
    signalled = time.monotonic()
    try:
        seconds = kill(process, sig, timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    late = [(t, method, path) for t, method, path in proxy.seen if t > signalled]
    after = [] if len(late) <= on_the_wire and all(t < signalled + 1 for t, _, _ in late) else late
    text = log.read_text()
    assert process.returncode == 128 + sig, text[-3000:]
    assert seconds < 10, f"{signal.Signals(sig).name} took {seconds:.1f} s to end the process"
    assert after == [], f"storage requests after the signal: {after}"
    assert "Traceback" not in text, text[-3000:]


def wait_until(condition, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    """Poll ``condition()`` every 20 ms; AssertionError naming ``what`` on timeout or if ``process`` ends."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


# --- processes left behind --------------------------------------------------------


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time in clock ticks) of ``pid`` from /proc, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[1]), fields[0], int(fields[19])


def descendants(pid: int) -> set[tuple[int, int]]:
    """Every process whose parent chain leads to ``pid``, as (pid, start time): a reused pid
    then cannot pass for a survivor."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if (stat := _stat(child)) is not None:
                found.add((child, stat[2]))
                todo.append(child)
    return found


def survivors(processes: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Those of ``processes`` still running (zombies, dead but not yet reaped, do not count)."""
    alive = set()
    for pid, started in processes:
        stat = _stat(pid)
        if stat is not None and stat[2] == started and stat[1] not in ("Z", "X"):
            alive.add((pid, started))
    return alive
