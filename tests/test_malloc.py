"""stylize.engine.malloc: freed tensors' pages stay mapped, so reallocating them costs no page faults."""

import json
import os
import platform
import subprocess
import sys

import pytest

from stylize.engine.malloc import tight, user_tunes_malloc

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# Allocates, frees and reallocates a 48 MiB tensor (over glibc's largest default mmap threshold, 32 MiB,
# under the tuned one, 64 MiB)
# and prints the minor page faults of the reallocation and the tuning's outcome.
PROBE = """
import json, resource, sys
import torch
from stylize.engine.optimize import Engine
state = Engine("cpu", retain_memory=sys.argv[1] == "1").malloc
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(3 * 2**22).sum()  # first touch: always faults
before = faults()
torch.ones(3 * 2**22).sum()
print(json.dumps({"state": state, "faults": faults() - before}))
"""


def probe(retain: bool, env: dict[str, str] | None = None) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ.pop("GLIBC_TUNABLES", None)
    environ.update(env or {})
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if retain else "0"], capture_output=True, text=True,
                         env=environ, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@glibc_only
def test_retained_memory_is_reused_without_page_faults():
    """Under 64 MiB; larger blocks are unmapped when freed (see test_large_blocks_are_not_kept)."""
    pages = 3 * 2**22 * 4 // 4096  # 12288 pages of 4 KiB
    untuned = probe(retain=False)
    assert untuned["state"] == "not asked"
    assert untuned["faults"] > pages // 2  # the control: glibc unmapped the block and the kernel refaults it
    tuned = probe(retain=True)
    assert tuned["state"] == "tuned"
    assert tuned["faults"] < pages // 10


@glibc_only
def test_user_settings_stand():
    result = probe(retain=True, env={"MALLOC_ARENA_MAX": "2"})
    assert result["state"] == "MALLOC_ARENA_MAX is set"
    assert result["faults"] > 3 * 2**22 * 4 // 4096 // 2


def test_user_tunes_malloc():
    assert user_tunes_malloc({}) is None
    assert user_tunes_malloc({"PATH": "/bin", "LD_PRELOAD": ""}) is None
    assert user_tunes_malloc({"MALLOC_TRIM_THRESHOLD_": "0"}) == "MALLOC_TRIM_THRESHOLD_ is set"
    assert user_tunes_malloc({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}) == "GLIBC_TUNABLES is set"
    assert user_tunes_malloc({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == "jemalloc is preloaded"


RELEASE_PROBE = """
import json, sys
import torch
from stylize.engine.malloc import release_freed_memory
from stylize.engine.optimize import Engine
state = Engine("cpu").malloc
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
big = torch.ones(3 * 2**22)  # 48 MiB from the heap
pin = torch.ones(1000)  # above it: the heap cannot shrink from the top
del big
kept = rss()
released = release_freed_memory()
print(json.dumps({"state": state, "released": released, "dropped": kept - rss()}))
"""


@glibc_only
def test_freed_memory_is_released_between_levels():
    """A level's blocks are handed back before the next level starts, even those below a block in use."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, env=environ,
                         check=True)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["state"] == "tuned" and result["released"]
    assert result["dropped"] > 0.9 * 3 * 2**24


LARGE_PROBE = """
import json
import torch
from stylize.engine.optimize import Engine
state = Engine("cpu").malloc
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
big = torch.ones(2**25)  # 128 MiB: mapped on its own
pin = torch.ones(1000)
before = rss()
del big
print(json.dumps({"state": state, "dropped": before - rss()}))
"""


@glibc_only
def test_large_blocks_are_not_kept():
    """A print's blocks (64 MiB and more) go back to the kernel when freed, so freed ones of other sizes
    never stay resident under the next."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", LARGE_PROBE], capture_output=True, text=True, env=environ,
                         check=True)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["state"] == "tuned" and result["dropped"] > 0.9 * 2**27


@pytest.mark.parametrize("threshold, per_level", [(0, 1 + 4), (10**9, 1)])
def test_large_levels_release_free_pages_after_every_evaluation(monkeypatch, threshold, per_level):
    """Once as each level starts; after every evaluation too (start + 3 steps) in a level of
    RELEASE_EACH_STEP_PIXELS or more."""
    from pathlib import Path

    from PIL import Image

    from stylize.engine import optimize
    from stylize.engine.settings import Settings

    calls = []
    monkeypatch.setattr(optimize, "RELEASE_EACH_STEP_PIXELS", threshold)
    monkeypatch.setattr(optimize, "release_freed_memory", lambda: calls.append(1))
    photo = Image.open(Path(__file__).parent / "data" / "chelsea.png").convert("RGB")
    s = Settings(size=64, iterations=3, scales=1, tolerance=0, precision="float32")
    optimize.Engine("cpu").run(photo, [photo], s)
    assert len(calls) == per_level


START_PROBE = """
import json, sys
import torch
from stylize.engine.malloc import start_level
from stylize.engine.optimize import Engine
state = Engine("cpu").malloc
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
started = start_level(int(sys.argv[1]), sys.argv[2] == "tight")
block = torch.ones(2**22)  # 16 MiB
pin = torch.ones(1000)  # above it: the heap cannot shrink from the top
before = rss()
del block
print(json.dumps({"state": state, "started": started, "dropped": before - rss()}))
"""


def test_a_level_is_tight_when_its_estimate_is_near_its_budget():
    assert tight(700, 1000) and not tight(500, 1000) and not tight(700, None)


@glibc_only
@pytest.mark.parametrize("pixels, budget, unmapped", [(2048 * 1362, "tight", True), (512 * 341, "tight", False),
                                                      (2048 * 1362, "roomy", False)])
def test_a_prints_levels_map_their_blocks_on_their_own(pixels, budget, unmapped):
    """At a level of RELEASE_EACH_STEP_PIXELS or more whose estimate is near its budget, a block of
    LARGE_LEVEL_MMAP_THRESHOLD (4 MiB) or more goes back to the kernel when freed, so it leaves no resident
    hole in the heap; a smaller level, or one with room under its budget, keeps its 16 MiB blocks for the
    next iteration."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", START_PROBE, str(pixels), budget], capture_output=True, text=True,
                         env=environ, check=True)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["state"] == "tuned" and result["started"]
    assert (result["dropped"] > 0.9 * 2**24) == unmapped, result
