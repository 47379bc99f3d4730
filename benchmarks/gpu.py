"""GPU throughput of the engine: batch sizes, precision, schedule, against the device's peak.

Prints, on one CUDA device (``--device cpu --quick`` checks the script itself):

1. the measured peak of a dense 3x3 convolution in bf16 and in float32/TF32;
2. per-iteration time at 512 px for batch sizes 1, 2, 4, ... in bf16 and
   float32, with achieved TFLOP/s (VGG19 to relu5_1, forward + input gradient)
   and its share of the peak;
3. quality: 500 fixed full-size float32 L-BFGS iterations (the reference)
   against the default schedule (coarse-to-fine, early stopping, bf16),
   judged by ``Engine.judge`` (float32, 512 px), with their times;
4. images per hour at the reference quality with the default schedule at the
   best batch size, decoding, encoding and writing each image to local disk
   included.

Targets (issue 7, one H100, 512 px): at least 4,000 images/hour at the
500-iteration quality; at least 35% of the measured bf16 convolution peak.

    python benchmarks/gpu.py                 # the full benchmark, a few minutes on an H100
    python benchmarks/gpu.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from _common import iteration_gflop
from stylize.engine import images
from stylize.engine.optimize import Engine
from stylize.engine.settings import Settings

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
DEMO = Path(__file__).resolve().parent.parent / "manifests" / "demo"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conv_peak(device: torch.device, dtype: torch.dtype, reps: int) -> float:
    """TFLOP/s of a dense 3x3 convolution (8x256x128x128 -> 256 channels, channels-last)."""
    b = 8 if device.type == "cuda" else 1
    x = torch.randn(b, 256, 128, 128, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        torch.nn.functional.conv2d(x, w, padding=1)
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.conv2d(x, w, padding=1)
    sync(device)
    seconds = (time.perf_counter() - start) / reps
    return 2 * b * 256 * 256 * 9 * 128 * 128 / seconds / 1e12


def load(path: Path) -> Image.Image:
    return images.decode(path.read_bytes(), name=str(path))


def iteration_time(engine: Engine, content, style, size: int, batch: int, precision: str, iterations: int):
    """Seconds per L-BFGS iteration for a batch (after two warm-up iterations)."""
    s = Settings(size=size, iterations=iterations, scales=1, tolerance=0, precision=precision)
    results = engine.run_batch([content] * batch, [style], s)
    t = [r.seconds for r in results[0].records]
    return (t[-1] - t[2]) / (len(t) - 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and counts, to check the script")
    args = parser.parse_args()
    device = torch.device(args.device)
    size = 64 if args.quick else args.size
    reference_iterations = 20 if args.quick else 500
    batches = [1, 2] if args.quick else [1, 2, 4, 8, 16, 32]
    engine = Engine(device)
    content = load(DEMO / "content" / "chelsea.jpg")
    style = load(DEMO / "styles" / "starry_night.jpg")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}")

    peaks = {"bfloat16": conv_peak(device, torch.bfloat16, 5 if args.quick else 50),
             "float32": conv_peak(device, torch.float32, 5 if args.quick else 50)}
    print(f"measured 3x3 conv peak: bf16 {peaks['bfloat16']:.1f} TFLOP/s, "
          f"float32{'/TF32' if device.type == 'cuda' else ''} {peaks['float32']:.1f} TFLOP/s\n")

    w, h = images.fit_size(*content.size, size)
    gflop = iteration_gflop(w, h)
    best = batch_sweep(engine, content, style, size, batches, gflop, peaks, (w, h))
    default = schedule_comparison(engine, content, style, size, reference_iterations)
    throughput(engine, default, best[1])
    best_share = 100 * gflop * best[0] / 1e3 / peaks["bfloat16"]
    print(f"best bf16 share of conv peak: {best_share:.1f}%; target 35%: {'met' if best_share >= 35 else 'NOT met'}")


def batch_sweep(engine: Engine, content, style, size: int, batches: list[int], gflop: float,
                peaks: dict[str, float], dims: tuple[int, int]) -> tuple[float, int]:
    """Time per iteration for each precision and batch size; returns (best bf16 images/s, its batch)."""
    print(f"per iteration at {dims[0]}x{dims[1]}: {gflop:.1f} GFLOP per image")
    print(f"{'precision':>9} {'batch':>5} {'ms/iter':>8} {'img-iter/s':>10} {'TFLOP/s':>8} {'% peak':>7}")
    best = (0.0, 1)
    for precision in ("bfloat16", "float32"):
        for batch in batches:
            try:
                seconds = iteration_time(engine, content, style, size, batch, precision, 8)
            except torch.OutOfMemoryError:
                print(f"{precision:>9} {batch:>5}  out of memory")
                break
            rate = batch / seconds
            tflops = gflop * rate / 1e3
            print(f"{precision:>9} {batch:>5} {1e3 * seconds:>8.1f} {rate:>10.1f} {tflops:>8.1f} "
                  f"{100 * tflops / peaks[precision]:>6.1f}%")
            if precision == "bfloat16" and rate > best[0]:
                best = (rate, batch)
    print(f"best bf16 batch: {best[1]}\n")
    return best


def schedule_comparison(engine: Engine, content, style, size: int, reference_iterations: int) -> Settings:
    """Fixed float32 iterations against the default schedule, judged the same way; returns the default."""
    reference = Settings(size=size, iterations=reference_iterations, scales=1, tolerance=0, precision="float32")
    start = time.perf_counter()
    ref = engine.run(content, [style], reference)
    ref_seconds = time.perf_counter() - start
    ref_q = engine.judge(ref.image, content, [style], reference, size=size)
    default = Settings(size=size, iterations=reference_iterations, precision="auto")
    start = time.perf_counter()
    fast = engine.run(content, [style], default)
    fast_seconds = time.perf_counter() - start
    fast_q = engine.judge(fast.image, content, [style], reference, size=size)
    print(f"{reference_iterations} fixed float32 iterations: {ref_seconds:.2f} s, judged loss {ref_q['total']:.4g} "
          f"(content {ref_q['content']:.4g}, style {ref_q['style']:.4g})")
    print(f"default schedule ({fast.precision}, {len(fast.records)} evaluations, levels {fast.sizes}): "
          f"{fast_seconds:.2f} s, judged loss {fast_q['total']:.4g} ({100 * (fast_q['total'] / ref_q['total'] - 1):+.1f}%)"
          f" -> {ref_seconds / fast_seconds:.1f}x faster")
    return default


def throughput(engine: Engine, default: Settings, n: int) -> None:
    """Images per hour with the default schedule at batch ``n``, I/O included."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        photos = [load(DEMO / "content" / "chelsea.jpg") for _ in range(n)]
        results = engine.run_batch(photos, [load(DEMO / "styles" / "starry_night.jpg")], default)
        for i, r in enumerate(results):
            (Path(tmp) / f"{i}.png").write_bytes(images.encode(r.image, "png"))
    seconds = time.perf_counter() - start
    per_hour = 3600 * n / seconds
    print(f"\nimages/hour at batch {n}, default schedule, I/O included: {per_hour:,.0f} "
          f"({seconds / n:.2f} s per image); target 4,000: {'met' if per_hour >= 4000 else 'NOT met'}")


if __name__ == "__main__":
    main()
