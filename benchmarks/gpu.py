"""GPU throughput of the engine and of the catalog flow, against the device's measured peak.

Prints, on one CUDA device (``--device cpu --quick`` checks the script itself in a minute):

1. the measured peak of a dense 3x3 convolution in bf16 and in float32/TF32;
2. per-iteration time at 512 px for batch sizes 1, 2, 4, ... in bf16 and
   float32, with achieved TFLOP/s (VGG19 to relu5_1, forward + input gradient,
   ``_common.iteration_gflop``) and its share of the peak; then the bf16 lines
   at batch 1 and at the best batch size;
3. quality: 500 fixed full-size float32 L-BFGS iterations (the reference)
   against the default schedule (coarse-to-fine, ``stop: done``, bf16),
   judged by ``Engine.judge`` (float32, 512 px), with their times;
4. images per hour at that quality through the real ``stylize-catalog`` flow
   on a mixed-shape catalog (``benchmarks/catalog.py``'s crops of 4:3, 3:2,
   16:9, 1:1, 3:4 and 9:16 times 3 styles, default settings), at the best
   batch size: reading, decoding, encoding, thumbnails, metadata and writes
   included, Prefect's start-up not; then batch occupancy (images per VGG19
   pass, from each job's ``engine.batch``, over the batch size asked for) and
   device utilization (the run summary's ``device_utilization``);
5. print sizes (issue 13; ``--skip-print`` leaves them out): a 4096x4096
   output (the square ``astronaut.png``, one level, ``--print-iterations``
   (5) L-BFGS steps, precision auto) with the default memory budget (90% of
   the free device memory) and with ``--print-budget`` (6GiB: tiles): seconds
   per iteration (mean after the first evaluation) and per megapixel-iteration,
   the plan (tile, history), peak memory (CUDA: allocated) against the budget,
   as ``benchmarks/large.py`` part 2 prints them on the CPU; then the default
   print schedule to 4096 px against the default 512 px run, its preview:
   wall time ratio, and the print shrunk to 512 px judged against the preview
   (``Engine.judge`` content and style losses, as ratios), as large.py part 3.

Targets (issue 7, one H100, 512 px): at least 4,000 images/hour at the
500-iteration quality; at least 35% of the measured bf16 convolution peak.
Issue 13: the tiled row within 2x the whole image's time per megapixel and
its peak within 110% of the budget; the print's judged losses within 15% of
the preview's.

    benchmarks/gpu.sh                        # the full benchmark, under 5 minutes on an H100 (part 5
                                             # included, estimated: it has not run on a GPU yet)
    benchmarks/gpu.sh --skip-print           # parts 1-4
    benchmarks/gpu.sh --device cpu --quick   # the script itself, on the CPU (part 5: a 128 px output,
                                             # and a 256 px print of a 64 px preview)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from _common import budget_line, iteration_gflop, print_against_preview, print_schedule_from, run_summary
from catalog import make_mixed_catalog
from stylize.engine import images
from stylize.engine.optimize import Engine
from stylize.engine.settings import Settings

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
#: Part 5's one-level rows: square, so that 4096 px is 4096x4096, as in large.py part 2.
SQUARE = DATA / "astronaut.png"


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


def batch_sweep(engine: Engine, content, style, size: int, batches: list[int], gflop: float,
                peaks: dict[str, float], dims: tuple[int, int], iterations: int = 8) -> dict[int, float]:
    """Time per iteration for each precision and batch size; returns bf16 seconds per iteration per batch."""
    print(f"per iteration at {dims[0]}x{dims[1]}: {gflop:.3g} GFLOP per image")
    print(f"{'precision':>9} {'batch':>5} {'ms/iter':>8} {'img-iter/s':>10} {'TFLOP/s':>8} {'% peak':>7}")
    bf16: dict[int, float] = {}
    for precision in ("bfloat16", "float32"):
        for batch in batches:
            try:
                seconds = iteration_time(engine, content, style, size, batch, precision, iterations)
            except torch.OutOfMemoryError:
                print(f"{precision:>9} {batch:>5}  out of memory")
                break
            tflops = gflop * batch / seconds / 1e3
            print(f"{precision:>9} {batch:>5} {1e3 * seconds:>8.1f} {batch / seconds:>10.1f} {tflops:>8.3g} "
                  f"{100 * tflops / peaks[precision]:>6.1f}%")
            if precision == "bfloat16":
                bf16[batch] = seconds
    return bf16


def print_bf16_lines(bf16: dict[int, float], gflop: float, peak: float) -> int:
    """Per-iteration time and TFLOP/s against the bf16 peak at batch 1 and at the best batch; returns the best."""
    best = max(bf16, key=lambda b: b / bf16[b])
    for label, batch in (("batch 1", 1), (f"best batch {best}", best)):
        tflops = gflop * batch / bf16[batch] / 1e3
        print(f"bf16 {label}: {1e3 * bf16[batch]:.2f} ms/iteration ({1e3 * bf16[batch] / batch:.2f} ms per image), "
              f"{tflops:.3g} TFLOP/s = {100 * tflops / peak:.1f}% of the measured bf16 conv peak ({peak:.3g} TFLOP/s)")
    return best


def schedule_comparison(engine: Engine, content, style, size: int, reference_iterations: int) -> None:
    """Fixed float32 iterations against the default schedule, judged the same way."""
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
    print(f"\n{reference_iterations} fixed float32 iterations: {ref_seconds:.2f} s, judged loss {ref_q['total']:.4g} "
          f"(content {ref_q['content']:.4g}, style {ref_q['style']:.4g})")
    print(f"default schedule ({fast.precision}, stop: {default.stop}, {len(fast.records)} evaluations, levels "
          f"{fast.sizes}): {fast_seconds:.2f} s, judged loss {fast_q['total']:.4g} "
          f"({100 * (fast_q['total'] / ref_q['total'] - 1):+.1f}%) -> {ref_seconds / fast_seconds:.1f}x faster")


def catalog_run(device: str, per_batch: int, photos: int, settings: dict) -> tuple[dict, float, list[int]]:
    """The stylize-catalog flow on a mixed-shape catalog: (summary, wall seconds, every job's engine.batch)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.api import ensure_api
    from flows.catalog import stylize_catalog

    ensure_api(startup_timeout=300)  # as `stylize run` does; a fresh database on a busy host is slow to start

    with tempfile.TemporaryDirectory(prefix="stylize-gpu-") as tmp:
        warm = make_mixed_catalog(Path(tmp) / "warm", DATA, photos=1, size=settings["size"], iterations=2)
        stylize_catalog(manifest=str(warm), devices=[device], images_per_batch=per_batch)  # Prefect, weights
        manifest = make_mixed_catalog(Path(tmp) / "run", DATA, photos=photos, size=settings["size"])
        started = time.perf_counter()
        summary = stylize_catalog(manifest=str(manifest), devices=[device], images_per_batch=per_batch,
                                  settings=settings)
        wall = time.perf_counter() - started
        batches = [json.loads(p.read_text())["engine"]["batch"] for p in (manifest.parent / "out").glob("*.json")]
    return summary, wall, batches


def catalog_throughput(device: str, per_batch: int, photos: int, size: int, iterations: int) -> None:
    """Images per hour through the flow at the default schedule; batch occupancy and device utilization."""
    settings = {"size": size, "iterations": iterations, "scales": Settings().scales, "precision": "auto"}
    summary, wall, batches = catalog_run(device, per_batch, photos, settings)
    counts = summary["counts"]
    if counts["done"] == 0 or not batches:
        raise SystemExit(f"the catalog flow finished no job: {counts}")
    per_pass = len(batches) / sum(1 / b for b in batches)  # images per VGG19 pass, over the passes
    utilization = summary.get("device_utilization")
    print(f"\ncatalog flow (stylize-catalog), {counts['done']} of {counts['total']} jobs done: {photos} mixed-shape "
          f"photos x 3 styles at {size} px, default schedule, images_per_batch {per_batch}, I/O included")
    print(f"images/hour through the flow: {3600 * counts['done'] / wall:,.0f} ({wall:.1f} s, "
          f"{wall / counts['done']:.2f} s per image); target 4,000: "
          f"{'met' if 3600 * counts['done'] / wall >= 4000 else 'NOT met'}")
    print(f"batch occupancy: {per_pass / per_batch:.2f} ({per_pass:.2f} images per VGG19 pass of {per_batch} asked for)")
    print("device utilization: " + ("not in the run summary" if utilization is None else f"{utilization:.2f}"))


def fresh_run(engine: Engine, content, style, settings: Settings):
    """``engine.run`` after handing the allocator's cached blocks back: the default budget is 90% of the
    device's free memory."""
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
    return engine.run(content, [style], settings)


def print_sizes(engine: Engine, style, size: int, iterations: int, budget: str, precision: str) -> None:
    """One level at ``size`` px, square: the default memory budget against ``budget``."""
    peak = "peak allocated" if engine.device.type == "cuda" else "peak RSS"
    print(f"\nprint size {size}x{size} ({SQUARE.name}), one level, {iterations} iterations, precision {precision}:")
    whole = None
    for label, max_memory in (("default budget", None), (f"max_memory {budget}", budget)):
        s = Settings(size=size, scales=1, iterations=iterations, tolerance=0, max_memory=max_memory,
                     precision=precision)
        row = run_summary(fresh_run(engine, load(SQUARE), style, s))
        whole = whole or row
        print(f"  {label} ({row['precision']}): {budget_line(row, whole, peak)}")


def print_schedule(engine: Engine, content, style, size: int, preview: int, extra: dict) -> None:
    """The default print schedule to ``size`` px against the default ``preview`` px run, judged at ``preview``;
    ``extra``: settings that --quick changes."""
    peak = "peak allocated" if engine.device.type == "cuda" else "peak RSS"
    print(f"\nprint schedule to {size} px against the default {preview} px run "
          f"({', '.join(f'{k} {v}' for k, v in extra.items()) or 'the defaults'}):")
    results = {name: fresh_run(engine, content, style, Settings(size=n, **extra))
               for name, n in (("preview", preview), ("print", size))}
    judged = {name: engine.judge(r.image, content, [style], Settings(), size=preview) for name, r in results.items()}
    rows = {name: run_summary(r) for name, r in results.items()}
    for line in print_against_preview(rows, judged, preview, peak):
        print(f"  {line}")


def print_part(args, engine: Engine, content, style) -> None:
    """Part 5 at 4096 px; under --quick, a 128 px output and a 256 px print of a 64 px preview (the print
    schedule scaled to it, as large.py --quick does), in float32 (bf16, the default where a CPU has it, is
    the slower there)."""
    quick = {"iterations": 5, "precision": "float32"} if args.quick else {}
    print_sizes(engine, style, 128 if args.quick else 4096, 3 if args.quick else args.print_iterations,
                args.print_budget, quick.get("precision", "auto"))
    top, preview = (256, 64) if args.quick else (4096, 512)
    with print_schedule_from(preview if args.quick else None):
        print_schedule(engine, content, style, top, preview, quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--photos", type=int, default=24, help="photos of the mixed catalog, each in 3 styles")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and counts, to check the script")
    parser.add_argument("--skip-print", action="store_true", help="leave out part 5 (print sizes)")
    parser.add_argument("--print-iterations", type=int, default=5, help="part 5's L-BFGS steps at 4096 px")
    parser.add_argument("--print-budget", default="6GiB", help="part 5's tiled row's max_memory")
    args = parser.parse_args()
    device = torch.device(args.device)
    size = 32 if args.quick else args.size
    reference_iterations = 5 if args.quick else 500
    batches = [1, 2] if args.quick else [1, 2, 4, 8, 16, 32]
    engine = Engine(device)
    content, style = load(DATA / "chelsea.png"), load(DATA / "starry_night.jpg")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}")

    reps = 5 if args.quick else 50
    peaks = {"bfloat16": conv_peak(device, torch.bfloat16, reps), "float32": conv_peak(device, torch.float32, reps)}
    print(f"measured 3x3 conv peak: bf16 {peaks['bfloat16']:.3g} TFLOP/s, "
          f"float32{'/TF32' if device.type == 'cuda' else ''} {peaks['float32']:.3g} TFLOP/s\n")

    w, h = images.fit_size(*content.size, size)
    gflop = iteration_gflop(w, h)
    bf16 = batch_sweep(engine, content, style, size, batches, gflop, peaks, (w, h), 4 if args.quick else 8)
    best = print_bf16_lines(bf16, gflop, peaks["bfloat16"])
    schedule_comparison(engine, content, style, size, reference_iterations)
    catalog_throughput(args.device, best, 4 if args.quick else args.photos, size,
                       2 if args.quick else Settings().iterations)
    if not args.skip_print:
        print_part(args, engine, content, style)


if __name__ == "__main__":
    main()
