"""Bytes per pixel of one VGG pass with its backward: what ``budget.WHOLE_PASS_BYTES`` and ``TILE_PASS_*`` count.

Run from the repository root (each row is its own process):

    .venv/bin/python benchmarks/pass_memory.py                       # bfloat16: whole 512/1024/1536, tiles 512/768/1024
    .venv/bin/python benchmarks/pass_memory.py --dtypes bfloat16,float32 --whole 1024 --tiles 768

A row builds a level's objective at its size (the photo's content targets, the painting's Grams; tiled
rows cut a ``--tile-image`` px image into tiles of that core), then evaluates loss and gradient twice, each
time from a trimmed heap (``malloc.start_level`` and ``release_freed_memory``, as the engine does), while
a thread samples the process's RSS (``VmRSS``) and glibc's live bytes (``mallinfo2``) every 5 ms. Per pixel:
(peak - before the evaluation) / pixels, the pixels being the image's for a whole-image pass and the
tile's outer box as ``budget.estimate`` counts it, ``min(h, core + 2 halo) x min(w, core + 2 halo)``, for a
tiled one (a tiled row also holds the image's gradient, 12 bytes per image pixel). RSS is what
``--max-memory`` bounds: it includes freed blocks still resident in the heap (``stylize.engine.malloc``),
``live`` does not. Rerun the tile rows after a change to ``stylize.engine.tiled`` and set the constant
above the largest RSS figure, with the margin the engine's own run needs (benchmarks/large.py part 2).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def inputs() -> tuple[Path, Path]:
    """(photo, painting): ../shared/data's when present, else the demo's."""
    if SHARED.is_dir():
        return SHARED / "content" / "chelsea.png", SHARED / "styles" / "starry_night.jpg"
    demo = ROOT / "manifests" / "demo"
    return demo / "content" / "chelsea.jpg", demo / "styles" / "starry_night.jpg"


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _probes():
    """(rss(), live()) in bytes: VmRSS, and glibc's bytes in use (heap + mapped blocks)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    def live() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    return rss, live


def _objective(spec: dict):
    """(objective, image requiring grad, pixels of the pass) for the spec's dtype, size and tile."""
    import torch
    from PIL import Image

    from stylize.engine import images
    from stylize.engine.losses import gram
    from stylize.engine.objective import Objective, run_features
    from stylize.engine.optimize import Engine
    from stylize.engine.settings import Settings
    from stylize.engine.tiled import halo_for, plan_tiles, tiled_features, tiled_grams

    dtype, tile = getattr(torch, spec["dtype"]), spec["tile"]
    s = Settings(precision=spec["dtype"])
    model = Engine("cpu").features(s)
    photo = Image.open(spec["content"]).convert("RGB")
    w, h = images.fit_size(*photo.size, spec["size"])
    x = images.to_tensor(images.resize(photo, (w, h)))
    style = images.to_tensor(images.resize(Image.open(spec["style"]).convert("RGB"), (w, h)))
    layers = s.content_layers + s.style_layers
    plan = None if tile is None else plan_tiles(h, w, tile, layers)
    with torch.no_grad():
        if plan is None:
            grams = {n: gram(f) for n, f in run_features(model, style, s.style_layers, dtype, True).items()}
            feats = run_features(model, x, s.content_layers, dtype, True)
        else:
            grams = tiled_grams(model, style, s.style_layers, plan, True)
            feats = tiled_features(model, x, s.content_layers, plan, True)
    halo, _ = halo_for(layers)
    pixels = w * h if plan is None else min(h, tile + 2 * halo) * min(w, tile + 2 * halo)
    objective = Objective(model, s, feats, grams, dtype, True, tiles=plan)
    return objective, (x + 0.05).clamp(0, 1).requires_grad_(True), pixels, (w, h)


def child(spec: dict) -> dict:
    """Two evaluations of the spec's objective; per evaluation the peak RSS and live bytes per pixel."""
    from stylize.engine.malloc import release_freed_memory, retain_freed_memory, start_level

    rss, live = _probes()
    retain_freed_memory()  # as Engine does; start_level only adjusts a tuned malloc
    start_level(spec["size"] * spec["size"], near_budget=not spec["roomy"])  # the engine's, for a level this size
    objective, x, pixels, size = _objective(spec)
    out = {"size": size, "pixels": pixels, "evaluations": []}
    for _ in range(2):
        release_freed_memory()
        before = (rss(), live())
        peak = list(before)
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0], peak[1] = max(peak[0], rss()), max(peak[1], live())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.perf_counter()
        objective(x)[0].sum().backward()
        x.grad = None
        done.set()
        sampler.join()
        out["evaluations"].append({"seconds": time.perf_counter() - started,
                                   "rss": (peak[0] - before[0]) / pixels, "live": (peak[1] - before[1]) / pixels})
    return out


def row(args, dtype: str, size: int, tile: int | None) -> None:
    import torch

    from stylize.engine import budget

    spec = {"content": str(args.content), "style": str(args.style), "dtype": dtype, "size": size, "tile": tile,
            "roomy": args.roomy}
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if done.returncode != 0:
        raise SystemExit(f"{spec} failed:\n{done.stderr[-3000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    if tile is None:
        counted = budget.WHOLE_PASS_BYTES[getattr(torch, dtype)]
    else:  # the fixed part spread over the outer box
        counted = round(budget.TILE_PASS_FIXED / data["pixels"] + budget.TILE_PASS_BYTES[getattr(torch, dtype)])
    evals = data["evaluations"]
    rss = " / ".join(f"{e['rss']:.0f}" for e in evals)
    live = " / ".join(f"{e['live']:.0f}" for e in evals)
    what = "whole image" if tile is None else f"tile {tile} (outer {data['pixels'] / 1e6:.2f} MP)"
    worst = max(e["rss"] for e in evals)
    print(f"  {dtype:<8} {what:<28} {data['size'][0]}x{data['size'][1]}: RSS {rss} B/px, live {live} B/px; "
          f"budget.py counts {counted} ({'covers' if worst <= counted else 'UNDER'} the RSS); "
          f"{sum(e['seconds'] for e in evals) / len(evals):.1f} s/evaluation [load {os.getloadavg()[0]:.1f}]",
          flush=True)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16, float32")
    parser.add_argument("--whole", default="512,1024,1536", help="whole-image sizes (longest side), or ''")
    parser.add_argument("--tiles", default="512,768,1024", help="tile cores, or ''")
    parser.add_argument("--tile-image", type=int, default=2048, help="the tiled rows' image size (longest side)")
    parser.add_argument("--roomy", action="store_true",
                        help="malloc as for a level far below its budget (malloc.tight): 64 MiB blocks and up mapped")
    args = parser.parse_args()
    args.content, args.style = inputs()
    print(f"benchmarks/pass_memory.py on {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; bytes per pixel of the pass, evaluation 1 / 2; malloc as for a level "
          f"{'far below' if args.roomy else 'near'} its budget", flush=True)
    for dtype in args.dtypes.split(","):
        for size in [int(v) for v in args.whole.split(",") if v]:
            row(args, dtype, size, None)
        for tile in [int(v) for v in args.tiles.split(",") if v]:
            row(args, dtype, args.tile_image, tile)


if __name__ == "__main__":
    main()
