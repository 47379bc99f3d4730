"""Orchestration overhead and memory of the catalog flow on CPU.

Runs the ``stylize-catalog`` flow over catalogs of tiny jobs (32 px, 2
iterations) in fresh processes and prints, for each catalog size:

* the orchestration overhead per job: (flow wall time - time inside the
  engine) / jobs, i.e. Prefect task runs, manifest expansion, reads, checksums,
  encoding and writes;
* the process's peak RSS.

Targets (issue 4): overhead under 50 ms per job; peak RSS at 1,000 jobs within
10% of that at 200.

    .venv/bin/python benchmarks/catalog.py            # 200 and 1,000 jobs
    .venv/bin/python benchmarks/catalog.py --jobs 50  # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_catalog(folder: Path, jobs: int) -> Path:
    """``jobs`` distinct 32x24 photos and one style, as a grid manifest."""
    from PIL import Image

    photos = folder / "photos"
    photos.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(jobs):
        image = Image.new("RGB", (32, 24), tuple(rng.randrange(256) for _ in range(3)))
        image.putpixel((i % 32, (i // 32) % 24), (255, 255, 255))
        image.save(photos / f"p{i:05d}.png")
    Image.new("RGB", (32, 32), (30, 60, 200)).save(folder / "style.png")
    manifest = folder / "manifest.yaml"
    manifest.write_text(
        "version: 1\noutput: out\n"
        "defaults: {size: 32, iterations: 2, scales: 1, precision: float32}\n"
        "grid:\n  contents: [photos/]\n  styles: [style.png]\n"
    )
    return manifest


def child(jobs: int) -> None:
    """Run one catalog in this process and print a JSON line with the figures."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_catalog(Path(tmp), jobs)
        from flows.catalog import stylize_catalog

        # Warm up: Prefect's API and the model load are paid once per process, not per job.
        warm = make_catalog(Path(tmp) / "warm", 2)
        stylize_catalog(manifest=str(warm))
        started = time.perf_counter()
        summary = stylize_catalog(manifest=str(manifest))
        wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    print(json.dumps({
        "jobs": jobs, "done": summary["counts"]["done"], "wall": wall,
        "engine": summary["engine_seconds"], "peak_mib": peak,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    rows = []
    for jobs in args.jobs:
        out = subprocess.run([sys.executable, __file__, "--child", str(jobs)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"catalog of {jobs} jobs failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    print(f"{'jobs':>6} {'done':>6} {'wall s':>8} {'engine s':>9} {'overhead ms/job':>16} {'peak RSS MiB':>13}")
    for r in rows:
        overhead = 1000 * (r["wall"] - r["engine"]) / r["jobs"]
        r["overhead_ms"] = overhead
        print(f"{r['jobs']:>6} {r['done']:>6} {r['wall']:>8.1f} {r['engine']:>9.1f} {overhead:>16.1f} {r['peak_mib']:>13.0f}")
    worst = max(r["overhead_ms"] for r in rows)
    print(f"target overhead < 50 ms/job: {'met' if worst < 50 else 'NOT met'} (worst {worst:.1f} ms)")
    if len(rows) >= 2:
        growth = rows[-1]["peak_mib"] / rows[0]["peak_mib"] - 1
        print(f"target peak RSS at {rows[-1]['jobs']} within 10% of {rows[0]['jobs']}: "
              f"{'met' if growth <= 0.10 else 'NOT met'} ({100 * growth:+.1f}%)")


if __name__ == "__main__":
    main()
