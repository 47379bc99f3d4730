"""Typed progress events and the one terminal view that draws them."""

from __future__ import annotations

import threading

import pytest

from stylize.app.view import ProgressView
from stylize.catalog import progress
from stylize.catalog.jobs import Outcome
from stylize.engine.optimize import Record


def record(iteration: int, scale: int) -> Record:
    return Record(iteration, scale, total=2.0, content=1.0, style=0.5, tv=0.5, seconds=0.1)


def test_emit_without_a_sink_is_a_no_op():
    progress.emit(progress.RunStarted(3))  # nobody listens: nothing happens, nothing raises


def test_events_reach_the_sink_from_threads_started_within():
    seen: list = []
    with progress.reporting(seen.append):
        progress.emit(progress.RunStarted(2))
        import contextvars

        thread = threading.Thread(target=contextvars.copy_context().run,
                                  args=(progress.emit, progress.Iteration("a", record(1, 1), 10)))
        thread.start()
        thread.join()
    progress.emit(progress.RunStarted(99))  # after the block: not delivered
    assert [type(e).__name__ for e in seen] == ["RunStarted", "Iteration"]


def test_a_failing_sink_never_stops_the_run(caplog):
    def broken(event):
        raise ValueError("terminal gone")

    with progress.reporting(broken):
        progress.emit(progress.RunStarted(1))
    assert "progress sink failed on RunStarted" in caplog.text


@pytest.fixture
def view(monkeypatch):
    monkeypatch.setenv("STYLIZE_PROGRESS", "1")
    with ProgressView() as view:
        yield view


def tasks(view: ProgressView) -> dict:
    return {t.description: t for t in view._progress.tasks}


def test_view_draws_a_run_jobs_and_the_current_level(view):
    progress.emit(progress.RunStarted(2))
    for i in range(3):
        progress.emit(progress.Iteration("cat", record(i, 1), 10))
    progress.emit(progress.Iteration("cat", record(7, 2), 10))  # next level: the bar starts over
    progress.emit(progress.JobFinished(Outcome("cat", "done"), 1, 2))
    drawn = tasks(view)
    assert (drawn["jobs"].total, drawn["jobs"].completed) == (2, 1)
    assert drawn["jobs"].fields["detail"] == "last: cat done"
    level = drawn["cat (scale 2)"]
    assert (level.total, level.completed) == (10, 0)
    assert level.fields["detail"].startswith("loss 2 (c 1 s 0.5 tv 0.5)")


def test_view_of_one_image_shows_iterations_only(view):
    for i in range(4):
        progress.emit(progress.Iteration("out", record(i, 1), 5))
    drawn = tasks(view)
    assert "jobs" not in drawn and drawn["out (scale 1)"].completed == 3


def test_disabled_view_does_not_listen(monkeypatch):
    monkeypatch.delenv("STYLIZE_PROGRESS", raising=False)
    with ProgressView(enabled=False) as view:
        progress.emit(progress.RunStarted(1))
    assert view._progress is None
