"""The fast paths (bf16 autocast, TF32, channels-last, torch.compile) end where float32 ends.

A short L-BFGS run follows a chaotic path: bf16 rounding changes the first
steps, and after a handful of iterations two runs differ by far more than
rounding. What must agree is where they end up, so each case runs long enough
to settle and compares the final image's judged losses (``Engine.judge``:
float32, one fixed size), against the float32 reference on the same device.
The stated tolerance is ``FINAL_LOSS_TOLERANCE``.

The CPU bf16 case runs everywhere (torch computes bf16 on any x86 CPU, fast
only with AVX-512 BF16 or AMX); the CUDA cases run where a GPU exists and are
skipped otherwise.
"""

from pathlib import Path

import pytest
import torch
from PIL import Image

from stylize.engine.optimize import Engine
from stylize.engine.settings import Settings

DATA = Path(__file__).parent / "data"

#: Relative difference allowed between a fast path's final judged losses and float32's.
FINAL_LOSS_TOLERANCE = 0.05

SIZE = 64
ITERATIONS = 60

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def pair():
    cat = Image.open(DATA / "chelsea.png").convert("RGB")
    starry = Image.open(DATA / "starry_night.jpg").convert("RGB")
    return cat, [starry]


def settings(precision: str) -> Settings:
    return Settings(size=SIZE, iterations=ITERATIONS, scales=1, tolerance=0, precision=precision, seed=0)


def judged_after_run(engine: Engine, precision: str, pair) -> dict[str, float]:
    content, styles = pair
    s = settings(precision)
    result = engine.run(content, styles, s)
    assert result.precision == precision
    # Judge on the CPU in float32 whatever ran the optimization, so only the path differs.
    return Engine("cpu").judge(result.image, content, styles, s, size=SIZE)


def assert_close_losses(fast: dict[str, float], reference: dict[str, float]) -> None:
    for key in ("total", "content", "style"):
        assert fast[key] == pytest.approx(reference[key], rel=FINAL_LOSS_TOLERANCE), key


@pytest.fixture(scope="module")
def cpu_float32(pair):
    return judged_after_run(Engine("cpu", channels_last=False, fused=False), "float32", pair)


def test_cpu_bfloat16_matches_float32(pair, cpu_float32):
    fast = judged_after_run(Engine("cpu"), "bfloat16", pair)
    assert_close_losses(fast, cpu_float32)


def test_cpu_channels_last_and_fused_match_float32(pair, cpu_float32):
    fast = judged_after_run(Engine("cpu", channels_last=True, fused=True), "float32", pair)
    assert_close_losses(fast, cpu_float32)


@pytest.fixture(scope="module")
def cuda_float32(pair):
    engine = Engine("cuda", channels_last=False, tf32=False, cudnn_benchmark=False, fused=False)
    return judged_after_run(engine, "float32", pair)


@needs_cuda
@pytest.mark.parametrize("options, precision", [
    (dict(channels_last=False, tf32=True), "float32"),
    (dict(channels_last=True, tf32=False), "float32"),
    (dict(channels_last=True, tf32=True, cudnn_benchmark=True), "bfloat16"),
    (dict(channels_last=True, tf32=True, cudnn_benchmark=True, compile=True), "bfloat16"),
], ids=["tf32", "channels-last", "bf16", "bf16-compiled"])
def test_cuda_fast_paths_match_float32(pair, cuda_float32, options, precision):
    fast = judged_after_run(Engine("cuda", **options), precision, pair)
    assert_close_losses(fast, cuda_float32)
