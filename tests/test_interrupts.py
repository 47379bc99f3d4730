"""The interrupt watchdog: after Ctrl+C or SIGTERM a process whose exit waits on a hung thread
still ends at the deadline, running its last rites first (and its at-once callbacks as the signal
comes); without a signal nothing happens."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

# A process that, inside bounded_interrupts, leaves a non-daemon thread hanging (as a stalled
# request would), says "ready", then waits to be signalled; at exit Python joins that thread.
SCRIPT = """
import sys, threading, time
from stylize.app.interrupts import bounded_interrupts

def say(line):  # one write per line: print() writes the text and its newline apart, and two threads print
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()

hung = threading.Thread(target=time.sleep, args=(120,))
with bounded_interrupts(deadline={deadline}, at_once=[lambda: say("at once")], last_rites=[lambda: say("last rites")]):
    hung.start()
    try:
        say("ready")
        time.sleep({wait})
    except KeyboardInterrupt as exc:
        say("unwound " + type(exc).__name__)
say("left the block")
"""


def start(deadline: float, wait: float) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", SCRIPT.format(deadline=deadline, wait=wait)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "KeyboardInterrupt"),
                                             (signal.SIGTERM, 143, "Terminated")])
def test_a_signal_ends_a_process_stuck_on_a_hung_thread_at_the_deadline(sig, code, name):
    process = start(deadline=1.0, wait=60)
    sent = time.monotonic()
    process.send_signal(sig)
    out, err = process.communicate(timeout=30)
    seconds = time.monotonic() - sent
    assert process.returncode == code, err
    lines = out.splitlines()
    # at_once runs in the watchdog's thread as the signal comes, while the main thread unwinds
    assert lines.index("at once") < lines.index("last rites"), lines
    lines.remove("at once")
    assert lines == [f"unwound {name}", "left the block", "last rites"]  # then os._exit
    assert "still running 1 s after the interrupt" in err
    assert 1.0 <= seconds < 5, seconds  # not the hung thread's 120 s


def test_without_a_signal_the_watchdog_stays_quiet():
    process = start(deadline=0.2, wait=0.5)
    time.sleep(1.0)  # well past the deadline: an armed watchdog would have ended the process
    assert process.poll() is None  # Python's exit still waits on the hung thread, as it should
    process.kill()
    out, err = process.communicate(timeout=30)
    assert out.splitlines() == ["left the block"] and "last rites" not in out and "at once" not in out and "still running" not in err
