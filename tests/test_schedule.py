"""When a level stops: ``stop: done`` (the default) ends it once improvement stalls; ``converged`` is the old rule."""

from pathlib import Path

import pytest
from PIL import Image

from stylize.engine.optimize import Engine
from stylize.engine.schedule import DONE_TOLERANCE, converged, stop_tolerance
from stylize.engine.settings import Settings

DATA = Path(__file__).parent / "data"


def history(rate: float, steps: int, start: float = 1000.0) -> list[float]:
    """A loss that falls by ``rate`` (a fraction) per iteration."""
    return [start * (1 - rate) ** k for k in range(steps + 1)]


def old_rule(totals: list[float], tolerance: float, window: int) -> bool:
    """The stopping rule before issue 15, written out: best loss improved by < tolerance over the window."""
    if tolerance <= 0 or len(totals) <= window:
        return False
    before, now = min(totals[:-window]), min(totals)
    return (before - now) / before < tolerance


def test_done_stops_a_stalled_level_that_converged_keeps_going():
    # Improving about 0.02% per iteration: 0.4% over 20, under done's threshold, over converged's 0.1%.
    stalled = history(2e-4, 40)
    assert converged(stalled, Settings(stop="done"))
    assert not converged(stalled, Settings(stop="converged"))
    # Still improving fast: neither stops.
    assert not converged(history(5e-3, 40), Settings(stop="done"))
    # A plateau: both stop.
    assert converged([5.0] * 30, Settings(stop="converged"))


def test_stop_tolerance_of_each_preset():
    assert Settings().stop == "done"
    assert stop_tolerance(Settings()) == max(Settings().tolerance, DONE_TOLERANCE) > Settings().tolerance
    assert stop_tolerance(Settings(stop="converged")) == Settings().tolerance
    assert stop_tolerance(Settings(stop="done", tolerance=0.5)) == 0.5  # a looser tolerance still applies
    assert stop_tolerance(Settings(tolerance=0)) == stop_tolerance(Settings(stop="converged", tolerance=0)) == 0


SMALL = dict(size=32, scales=1, precision="float32", tolerance_window=3)


@pytest.fixture(scope="module")
def runs():
    """The same small run under both presets: ``done`` with a budget it does not need, then ``converged``
    with a few iterations more than ``done`` took."""
    engine = Engine("cpu")
    cat = Image.open(DATA / "chelsea.png").convert("RGB")
    starry = Image.open(DATA / "starry_night.jpg").convert("RGB")
    done = engine.run(cat, [starry], Settings(**SMALL, iterations=100, stop="done"))
    budget = done.records[-1].iteration + 5
    fine = engine.run(cat, [starry], Settings(**SMALL, iterations=budget, stop="converged"))
    return done, fine


def test_done_ends_the_run_early_when_improvement_stalls(runs):
    done, fine = runs
    assert done.stopped_early == [True]
    assert done.records[-1].iteration < 100
    totals = [r.total for r in done.records]
    # It stopped at the first iteration where its rule held, not before; converged did not stop there.
    s = Settings(**SMALL, iterations=100)
    assert converged(totals, s)
    assert not any(converged(totals[:k], s) for k in range(2, len(totals)))
    assert fine.records[-1].iteration > done.records[-1].iteration


def test_converged_preset_runs_the_old_schedule(runs):
    done, fine = runs
    budget = done.records[-1].iteration + 5
    totals = [r.total for r in fine.records]
    # The same iterates as done up to where done stopped (same start, same steps) ...
    assert totals[:len(done.records)] == [r.total for r in done.records]
    # ... and it went on until the old rule first held, or to its budget, exactly as before issue 15.
    first = next((k for k in range(2, len(totals) + 1) if old_rule(totals[:k], Settings().tolerance, 3)), None)
    assert first == len(totals) or first is None and fine.records[-1].iteration == budget
