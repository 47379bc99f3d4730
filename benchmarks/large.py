"""Print-size figures: tiled against whole-image optimization, memory budgets, and the print schedule.

Run from the repository root (each measurement is its own subprocess, so peak RSS is per run):

    .venv/bin/python benchmarks/large.py                  # every part; the 4096 px row last (~30 min on 2 cores)
    .venv/bin/python benchmarks/large.py --skip-4096      # without the 4096 px row
    .venv/bin/python benchmarks/large.py --quick          # 256/512 px smoke test of every part (part 3: a
                                                          # 512 px print of a 128 px preview, the schedule's
                                                          # thresholds scaled by 1/4)

Parts, in one run:

1. 1024 px, float32, one level, ``--iterations`` L-BFGS steps: the whole image against ``--tile 512``:
   seconds per iteration (mean over iterations after the first evaluation, from ``Record.seconds``) and
   peak RSS; then where a tiled evaluation's time goes (the Gram pass, the tiles' forward and backward
   passes, measured by ``stylize.engine.tiled``) and how much of each tile is halo.
2. 2048 and 4096 px with ``--max-memory 6GiB``: the plan the engine chose (tile, history), peak RSS
   against the budget (target: within +10%), seconds per iteration and per megapixel-iteration against
   the whole-image 1024 px row (target: at most 2x). 4096 px runs ``--top-iterations`` (1) step. Then
   the ``bf16`` row: 2048 px in bfloat16 (the CPU's default precision) under ``--bf16-budget`` (3GiB:
   the top level gets tiles and a 10-step history), 160 iterations (10 at the top level, 40 at 1024 px),
   so that the top level's steps fill its history: L-BFGS allocates the history at the first step, but
   its pages become resident only as the steps fill them, so a 1-step row leaves most of it out of the
   peak RSS.
3. A 2048 px print with the default settings (levels 256, 512, 1024, 2048, fewer iterations at the top,
   precision auto, ``--max-memory`` 6GiB) against a default 512 px run, its preview; then the print,
   downscaled to 512, judged against the preview (``Engine.judge``: content and style losses, target:
   within 15% of each other). ``--schedule-iterations N`` shortens both runs.

Every row prints the 1-minute load average: the machine is shared, and a load above 2 means the times
are pessimistic.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import budget_line, describe_plan, print_against_preview, print_schedule_from, run_summary

ROOT = Path(__file__).resolve().parent.parent
#: The photo and the painting: ../shared/data's when present (chelsea 451x300, The Starry Night 1024x640),
#: else the demo's (the same photo, the painting at 512x320); --quick uses tests/data's 128 px copies.
SHARED = ROOT.parent / "shared" / "data"
#: Part 2's content: square, so the 4096 px row is 4096x4096, the issue's target (its content does not
#: change memory or time).
SQUARE = ROOT / "tests" / "data" / "astronaut.png"


def inputs(data: Path | None, quick: bool) -> tuple[Path, Path]:
    """(photo, painting) for parts 1 and 3."""
    if quick:
        return ROOT / "tests" / "data" / "chelsea.png", ROOT / "tests" / "data" / "starry_night.jpg"
    if data is None:
        data = SHARED if SHARED.is_dir() else None
    if data is None:
        demo = ROOT / "manifests" / "demo"
        return demo / "content" / "chelsea.jpg", demo / "styles" / "starry_night.jpg"
    return data / "content" / "chelsea.png", data / "styles" / "starry_night.jpg"


def images(args) -> dict:
    """The photo and painting entries of a child's spec."""
    return {"content": str(args.content), "style": str(args.style)}


def child_run(spec: dict) -> dict:
    """One Engine.run in this process; prints a JSON line."""
    from PIL import Image

    from stylize.engine.optimize import Engine
    from stylize.engine.settings import Settings

    content = Image.open(spec["content"]).convert("RGB")
    style = Image.open(spec["style"]).convert("RGB")
    s = Settings(**spec["settings"])
    with print_schedule_from(spec.get("print_base")):  # --quick: the print schedule scaled (see part_schedule)
        result = Engine("cpu").run(content, [style], s)
    if spec.get("output"):
        result.image.save(spec["output"])
    return run_summary(result)


def child_breakdown(spec: dict) -> dict:
    """Where a tiled evaluation's time goes: ``repeats`` evaluations of the tiled objective at ``size``."""
    import torch

    from stylize.engine import images
    from stylize.engine.objective import Objective, run_features
    from stylize.engine.optimize import Engine
    from stylize.engine.losses import gram
    from stylize.engine.settings import Settings
    from stylize.engine.tiled import plan_tiles
    from PIL import Image

    s = Settings(precision="float32")
    engine = Engine("cpu")
    model = engine.features(s)
    photo = Image.open(spec["content"]).convert("RGB")
    w, h = images.fit_size(*photo.size, spec["size"])
    x = images.to_tensor(images.resize(photo, (w, h)))
    plan = plan_tiles(h, w, spec["tile"], s.content_layers + s.style_layers)
    style = images.to_tensor(images.resize(Image.open(spec["style"]).convert("RGB"), (w, h)))
    with torch.no_grad():
        grams = {n: gram(f) for n, f in run_features(model, style, s.style_layers, torch.float32, True).items()}
        feats = run_features(model, x, s.content_layers, torch.float32, True)
    objective = Objective(model, s, feats, grams, torch.float32, True, tiles=plan)
    xs = (x + 0.05).clamp(0, 1).requires_grad_(True)
    objective(xs)[0].sum().backward()  # warm-up: oneDNN builds its kernels per tile shape
    objective.timings.clear()
    started = time.perf_counter()
    for _ in range(spec["repeats"]):
        xs.grad = None
        objective(xs)[0].sum().backward()
    total = (time.perf_counter() - started) / spec["repeats"]
    parts = {k: v / spec["repeats"] for k, v in objective.timings.items()}
    outer = sum((t.outer[1] - t.outer[0]) * (t.outer[3] - t.outer[2]) for t in plan.tiles)
    return {"total": total, "parts": parts, "tiles": len(plan.tiles), "halo_share": 1 - h * w / outer}


def child_judge(spec: dict) -> dict:
    """Judge the print (downscaled) and the preview against the same photo and style at 512 px."""
    from PIL import Image

    from stylize.engine.optimize import Engine
    from stylize.engine.settings import Settings

    engine = Engine("cpu")
    content = Image.open(spec["content"]).convert("RGB")
    style = Image.open(spec["style"]).convert("RGB")
    s = Settings()
    return {name: engine.judge(Image.open(path).convert("RGB"), content, [style], s, size=spec["size"])
            for name, path in spec["images"].items()}


def run_child(kind: str, spec: dict) -> dict:
    """Run a child measurement; returns its JSON with its peak RSS (MiB, from wait4) and the load average."""
    cmd = [sys.executable, __file__, "--child", kind, json.dumps(spec)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        err.seek(0)
        if status != 0:
            raise SystemExit(f"{kind} {spec} failed:\n{err.read().decode()[-3000:]}")
        data = json.loads(out.read().decode().strip().splitlines()[-1])
    data["peak_mib"] = usage.ru_maxrss / 1024
    data["load"] = os.getloadavg()[0]
    return data


def settings(size: int, iterations: int, **extra) -> dict:
    return dict(size=size, iterations=iterations, scales=1, tolerance=0, precision="float32",
                max_pixels=max(4096 * 4096, size * size)) | extra


def say(line: str) -> None:
    print(line, flush=True)


def part_tiling(args) -> dict:
    size, tile = args.base, args.base // 2
    say(f"\n== 1. {size} px: whole image against --tile {tile} ({args.iterations} iterations, float32)")
    whole = run_child("run", {**images(args), "settings": settings(size, args.iterations)})
    tiled = run_child("run", {**images(args),
                              "settings": settings(size, args.iterations, tile=tile)})
    for name, row in (("whole image", whole), (f"tile {tile}", tiled)):
        say(f"  {name:<12} {row['per_iteration']:7.2f} s/iteration   peak RSS {row['peak_mib']:7.0f} MiB   "
            f"[{describe_plan(row)}; load {row['load']:.1f}]")
    ratio = tiled["per_iteration"] / whole["per_iteration"]
    say(f"  tiled / whole: {ratio:.2f}x time per iteration (target <= 2x: {'met' if ratio <= 2 else 'NOT met'})")
    parts = run_child("breakdown", {**images(args), "size": size, "tile": tile,
                                    "repeats": 2})
    shown = ", ".join(f"{k} {v:.1f} s ({v / parts['total']:.0%})" for k, v in parts["parts"].items())
    say(f"  one tiled evaluation: {parts['total']:.1f} s = {shown}; {parts['tiles']} tiles, "
        f"{parts['halo_share']:.0%} of the pixels run are halo [load {parts['load']:.1f}]")
    return whole


def part_budget(args, whole: dict, size: int, iterations: int, precision: str = "float32",
                budget: str | None = None) -> None:
    row = run_child("run", {"content": str(SQUARE), "style": str(args.style),
                            "settings": settings(size, iterations, max_memory=budget or args.budget,
                                                 precision=precision)})
    w, h = row["sizes"][-1]
    say(f"  {w}x{h} {precision}: {budget_line(row, whole)}")
    # L-BFGS allocates its history (a ring buffer) at the first step; its pages become resident as steps fill
    # them, so a row of fewer steps than the history leaves part of it out (see the bf16 row).


def part_schedule(args, workdir: Path) -> None:
    n = args.schedule_iterations
    top = args.print_size
    say(f"\n== 3. print schedule to {top} px against a {top // 4} px run ({n or 'default'} iterations, "
        f"--max-memory {args.budget}, otherwise the defaults)")
    paths = {"print": str(workdir / "print.png"), "preview": str(workdir / "preview.png")}
    base = dict(max_memory=args.budget) | ({} if n is None else dict(iterations=n))
    # --quick scales the schedule's 512/1024 px thresholds with the sizes, so the print schedule still runs.
    scaled = {"print_base": top // 4} if args.quick else {}
    preview = run_child("run", {**images(args), "output": paths["preview"],
                                "settings": dict(base, size=top // 4), **scaled})
    printed = run_child("run", {**images(args), "output": paths["print"],
                                "settings": dict(base, size=top), **scaled})
    judged = run_child("judge", {**images(args), "images": paths, "size": top // 4})
    for line in print_against_preview({"preview": preview, "print": printed}, judged, top // 4):
        say(f"  {line}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, spec = sys.argv[2], json.loads(sys.argv[3])
        result = {"run": child_run, "breakdown": child_breakdown, "judge": child_judge}[kind](spec)
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of every part")
    parser.add_argument("--skip-4096", action="store_true", help="leave out the 4096 px row")
    parser.add_argument("--parts", default="123", help="which parts to run, e.g. 13")
    parser.add_argument("--iterations", type=int, default=8,
                        help="part 1's steps; its whole-image row is part 2's reference, and one step's time "
                        "varies by 10-15%% on a shared host")
    parser.add_argument("--top-iterations", type=int, default=1, help="L-BFGS steps at 4096 px")
    parser.add_argument("--schedule-iterations", type=int, help="part 3's iterations (default: the default)")
    parser.add_argument("--budget", default="6GiB")
    parser.add_argument("--sizes", default="512,2048,4096,bf16",
                        help="part 2's rows, e.g. 4096, or bf16 (2048 px in bfloat16 under --bf16-budget)")
    parser.add_argument("--bf16-budget", default="3GiB", help="part 2's bf16 row's --max-memory")
    parser.add_argument("--keep", metavar="DIR", help="keep part 3's print.png and preview.png in DIR")
    parser.add_argument("--data", type=Path, help="a folder with content/chelsea.png and styles/starry_night.jpg "
                        "(default: ../shared/data, else the demo's images)")
    args = parser.parse_args()
    args.content, args.style = inputs(args.data, args.quick)
    args.base, args.print_size, sizes = (256, 512, [512]) if args.quick else (1024, 2048, [2048, 4096])
    if args.skip_4096:
        sizes = [s for s in sizes if s != 4096]
    if args.quick:
        args.budget = args.bf16_budget = "1.2GiB"
        args.schedule_iterations = args.schedule_iterations or 20
    load = os.getloadavg()[0]
    say(f"benchmarks/large.py on {os.cpu_count()} CPUs, load {load:.1f}, {time.strftime('%Y-%m-%d %H:%M')}"
        + (" (the CPUs are shared: times are pessimistic)" if load > (os.cpu_count() or 1) else ""))
    whole = part_tiling(args) if "1" in args.parts else None
    if whole is None and "2" in args.parts:  # part 2's reference row
        whole = run_child("run", {**images(args),
                                  "settings": settings(args.base, args.iterations)})
    if "3" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            keep = Path(args.keep) if args.keep else Path(tmp)
            keep.mkdir(parents=True, exist_ok=True)
            part_schedule(args, keep)
    if "2" in args.parts:
        say(f"\n== 2. print sizes with --max-memory {args.budget} (float32; the bf16 row: bfloat16, "
            f"--max-memory {args.bf16_budget})")
        for size in [s for s in sizes if str(s) in args.sizes.split(",")]:
            part_budget(args, whole, size, args.top_iterations if size >= 4096 else 2)
        if "bf16" in args.sizes.split(","):
            part_budget(args, whole, sizes[0], 20 if args.quick else 160, "bfloat16", args.bf16_budget)


if __name__ == "__main__":
    main()
