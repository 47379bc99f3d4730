"""Memory plans (whole image or tiles, history length) and the print schedule."""

import pytest
import torch

from stylize.engine.budget import estimate, plan_memory, smaller_tile
from stylize.engine.schedule import level_iterations, level_sizes
from stylize.engine.settings import Settings, parse_size
from stylize.errors import ResourceError

CPU = torch.device("cpu")


def plan(size, **kw):
    s = Settings(size=size, max_pixels=max(size * size, 256), **kw)
    return plan_memory(size, size, 1, 3, s, torch.float32, CPU)


def test_whole_image_when_it_fits_tiles_when_not():
    assert plan(512, max_memory="6GiB").tile is None
    p = plan(4096, max_memory="6GiB")
    assert p.tile is not None and p.estimate <= 6 * 2**30
    assert p.history < 50  # 50 image-sized steps at 4096 px alone are 20 GB
    # A larger budget buys larger tiles and a longer history, never less.
    q = plan(4096, max_memory="12GiB")
    assert q.tile >= p.tile and q.history >= p.history


def test_forced_tile_and_refusals():
    assert plan(1024, tile=256).tile == 256
    with pytest.raises(ResourceError, match=r"max_memory: a 8192x8192 px output needs at least .* GiB"):
        plan(8192, max_memory="6GiB")
    assert smaller_tile(plan(1024, tile=256), 1024, 1024) == 192


def test_estimate_grows_with_pixels_and_history():
    s = Settings()
    small = estimate(512, 512, 1, 3, s, torch.float32, CPU, None, 50)
    assert estimate(1024, 1024, 1, 3, s, torch.float32, CPU, None, 50) > 2.5 * small  # plus a fixed runtime
    assert estimate(512, 512, 1, 3, s, torch.float32, CPU, None, 5) < small


@pytest.mark.parametrize("text, expected", [("6GiB", 6 * 2**30), ("500MB", 500 * 10**6), ("2g", 2 * 2**30),
                                            ("1048576", 2**20), ("1.5 GiB", 3 * 2**29)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "0", "6 parsecs"])
def test_bad_sizes_name_the_field(text):
    with pytest.raises(ValueError, match="max_memory"):
        Settings(max_memory=text)


def test_print_schedule():
    # Up to 1024 px nothing changes: scales levels, the same iterations each.
    assert [max(wh) for wh in level_sizes(1000, 800, Settings(size=1024))] == [512, 1024]
    assert level_iterations(1024, Settings(size=1024, iterations=300)) == 300
    # A print runs its 512 px preview's levels first (scales, full iterations), then fewer iterations on
    # each doubling, so that every level above 512 px costs about what the 512 px level does.
    s = Settings(size=4096, iterations=400)
    assert [max(wh) for wh in level_sizes(4000, 3000, s)] == [256, 512, 1024, 2048, 4096]
    assert [level_iterations(n, s) for n in (256, 512, 1024, 2048, 4096)] == [400, 400, 100, 25, 6]
    assert level_iterations(4096, Settings(size=4096, iterations=20)) == 5
    assert level_iterations(4096, Settings(size=4096, iterations=3)) == 3
    preview = Settings(size=512, iterations=400)
    assert level_sizes(4000, 3000, preview) == level_sizes(4000, 3000, s)[:2]
    assert [max(wh) for wh in level_sizes(3000, 2000, Settings(size=2048, scales=1))] == [512, 1024, 2048]


def test_8192_px_is_refused_by_max_pixels_before_any_work(tmp_path, capsys, monkeypatch):
    """8192 px is over the default max_pixels (4096 x 4096): refused by that explicit limit, with one line
    naming it, before an engine is built or an image decoded; never by running out of memory."""
    from pathlib import Path

    from pydantic import ValidationError

    from stylize.app.cli import main
    from stylize.engine import optimize

    with pytest.raises(ValidationError, match=r"size 8192 .* max_pixels=16777216; use size <= 4096"):
        Settings(size=8192)
    monkeypatch.setattr(optimize.Engine, "__init__", lambda *a, **k: pytest.fail("an engine was built"))
    data = Path(__file__).parent / "data"
    out = tmp_path / "print.png"
    code = main(["image", str(data / "chelsea.png"), str(data / "starry_night.jpg"), "--size", "8192", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code in (1, 2) and len(err.splitlines()) == 1, err
    assert "max_pixels" in err and "8192" in err
    assert not out.exists()


def test_8192_px_with_max_pixels_raised_is_refused_by_the_budget_before_any_work():
    """Raising max_pixels moves the limit to max_memory: the engine plans every level first and refuses a
    budget that cannot hold the top one, naming it, before the first iteration of the coarsest level."""
    from pathlib import Path

    from PIL import Image

    from stylize.engine.optimize import Engine

    photo = Image.open(Path(__file__).parent / "data" / "chelsea.png").convert("RGB")
    calls = []
    s = Settings(size=8192, max_pixels=8192 * 8192, max_memory="6GiB", iterations=1)
    with pytest.raises(ResourceError, match=r"max_memory: a 8192x\d+ px output needs at least .*raise max_memory"):
        Engine("cpu").run(photo, [photo], s, callback=calls.append)
    assert calls == []


def test_a_tight_budget_keeps_the_history_in_bfloat16_before_shortening_it():
    s = Settings(size=512)
    f32 = estimate(512, 512, 1, 3, s, torch.float32, CPU, None, 50)
    bf16 = estimate(512, 512, 1, 3, s, torch.float32, CPU, None, 50, torch.bfloat16)
    assert bf16 < f32 - 512 * 512 * 3 * 2 * 50 * 2 + 1  # half the history's 2 x 50 float32 vectors
    between = plan(512, max_memory=str((f32 + bf16) // 2))
    assert (between.tile, between.history, between.history_dtype) == (None, 50, torch.bfloat16)
    assert between.describe()["history_dtype"] == "bfloat16"
    assert plan(512, max_memory=str(f32)).history_dtype == torch.float32


def test_a_run_records_its_history_dtype():
    """A 64 px run under a budget that fits 50 bfloat16 pairs but not 50 float32 ones: the level's
    metadata says bfloat16, and L-BFGS still lowers the loss."""
    from pathlib import Path

    from PIL import Image

    from stylize.engine.optimize import Engine

    photo = Image.open(Path(__file__).parent / "data" / "chelsea.png").convert("RGB")
    base = dict(size=64, iterations=6, scales=1, tolerance=0, precision="float32")
    s = Settings(**base)
    h, w = 42, 64
    f32 = estimate(h, w, 1, 3, s, torch.float32, CPU, None, 50)
    bf16 = estimate(h, w, 1, 3, s, torch.float32, CPU, None, 50, torch.bfloat16)
    result = Engine("cpu").run(photo, [photo.rotate(90, expand=True)],
                               Settings(**base, max_memory=str((f32 + bf16) // 2)))
    assert result.memory[0]["history"] == 50 and result.memory[0]["history_dtype"] == "bfloat16"
    assert result.records[-1].total < 0.7 * result.records[0].total


class ImageSizedBuffers:
    """Counts live image-sized buffers (float32: 1, bfloat16: 1/2) as they come and go, by watching every
    tensor operation (a ``TorchDispatchMode``); ``peak`` is the most held at once and ``at_peak`` which
    operations made them. Buffers within 3% of the image's size count (TV's neighbour differences are
    one row or column short), so the image must be far larger or smaller than any other tensor."""

    def __init__(self, numel: int):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode

        sizes = {numel * 4: 1.0, numel * 2: 0.5}
        live: dict[int, list] = {}  # storage address -> [op, units, tensors alive]
        self.peak, self.at_peak = 0.0, []
        counter = self

        def gone(key):
            entry = live.get(key)
            if entry is not None:
                entry[2] -= 1
                if entry[2] == 0:
                    del live[key]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if not isinstance(t, torch.Tensor):
                        continue
                    nbytes = t.untyped_storage().nbytes()
                    units = next((u for b, u in sizes.items() if 0.97 * b <= nbytes <= b), None)
                    if units is None:
                        continue
                    key = t.untyped_storage().data_ptr()
                    live.setdefault(key, [func.overloadpacket.__name__, units, 0])[2] += 1
                    weakref.finalize(t, gone, key)
                    held = sum(entry[1] for entry in live.values())
                    if held > counter.peak:
                        counter.peak, counter.at_peak = held, sorted(entry[0] for entry in live.values())
                return out

        self.mode = Mode()


@pytest.mark.parametrize("history_dtype", [torch.float32, torch.bfloat16])
def test_image_sized_buffers_of_a_tiled_level_are_counted(monkeypatch, history_dtype):
    """At a print's top level the estimate's image-sized term (IMAGE_VECTORS_HELD float32 vectors, and
    some headroom) holds every image-sized buffer alive at once (the iterate, its start, the photo,
    gradients, the step, L-BFGS's and TV's temporaries): counted op by op over a tiled 128 px level of
    three L-BFGS steps (history pairs apart, as the estimate counts them apart). At 4096 x 4096 each is
    201 MB."""
    from pathlib import Path

    from PIL import Image

    from stylize.engine import budget
    from stylize.engine.optimize import Engine

    monkeypatch.setattr(budget, "HISTORY_DTYPES", (history_dtype,))
    photo = Image.open(Path(__file__).parent / "data" / "astronaut.png").convert("RGB")
    style = Image.open(Path(__file__).parent / "data" / "starry_night.jpg").convert("RGB")
    # Shallow layers (a 16 px halo) keep the 2 x 2 tiles cheap; the code path is a print's.
    s = Settings(size=128, iterations=3, scales=1, tolerance=0, precision="float32", tile=64,
                 content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"))
    engine = Engine("cpu")
    counter = ImageSizedBuffers(128 * 128 * 3)
    with counter.mode:
        result = engine.run(photo, [style], s)
    assert result.memory[0]["tile"] == 64 and result.memory[0]["history_dtype"] == str(history_dtype)[6:]
    assert 4 <= counter.peak <= budget.IMAGE_VECTORS_HELD < budget.IMAGE_VECTORS, counter.at_peak
