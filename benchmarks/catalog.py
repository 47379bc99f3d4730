"""Orchestration overhead and memory of the catalog flow on CPU, and the report's build time.

Runs the ``stylize-catalog`` flow over catalogs of tiny jobs (32 px, 2
iterations) in fresh processes and prints, for each catalog size:

* the orchestration overhead per job: (flow wall time - time inside the
  engine) / jobs, i.e. Prefect task runs, manifest expansion, reads, checksums,
  encoding and writes, the thumbnails, the job log and the run's HTML report;
* of that, the report alone (built again after the run, timed);
* the process's peak RSS.

Then it synthesizes the metadata of a large output (``--report-jobs``, default
10,000 jobs of 300 loss records each, a job log and a run summary; no images)
and times ``stylize report`` on it, for the run and for the whole output.

Targets: overhead under 50 ms per job, thumbnails and report included (issues
4 and 14); peak RSS at 1,000 jobs within 10% of that at 200; the report of a
10,000-job output built in under 30 s (issue 14).

    .venv/bin/python benchmarks/catalog.py                       # 200 and 1,000 jobs; 10,000-job report
    .venv/bin/python benchmarks/catalog.py --jobs 50 --report-jobs 1000  # quick look
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
        # One image per optimization: a batch's engine seconds are counted for each of its jobs, so
        # with batches the engine total exceeds the wall time and the difference says nothing.
        stylize_catalog(manifest=str(warm), images_per_batch=1)
        started = time.perf_counter()
        summary = stylize_catalog(manifest=str(manifest), images_per_batch=1)
        wall = time.perf_counter() - started
        from stylize.catalog.report import build_run_report
        from stylize.catalog.storage import Storage

        started = time.perf_counter()  # the report the run wrote, built again on its own
        build_run_report(Storage(), summary["output"], summary["flow_run_id"], summary=summary)
        report = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    print(json.dumps({
        "jobs": jobs, "done": summary["counts"]["done"], "wall": wall,
        "engine": summary["engine_seconds"], "report": report, "peak_mib": peak,
    }))


def synthesize_output(root: Path, jobs: int, records: int = 300) -> str:
    """Metadata files as ``jobs`` finished jobs leave them (two levels, ``records`` loss records
    each), a job log and a run summary; returns the run id. No images: a report never reads them."""
    from stylize.catalog import metadata, runs
    from stylize.catalog.storage import Storage

    storage, rng = Storage(), random.Random(0)
    log = runs.JobLog(storage, str(root), "bench")
    its = list(range(records))
    for i in range(jobs):
        name = f"{i % 100:02d}/photo{i:06d}__starry_night"
        seconds = rng.lognormvariate(3, 0.5)
        decay = [1e6 / (1 + k) ** rng.uniform(0.3, 0.8) for k in its]
        meta = {
            "schema": metadata.SCHEMA, "job": name, "key": f"{i:064x}", "device": "cuda:0", "seconds": seconds,
            "output": {"uri": str(root / f"{name}.png"), "size": 500_000},
            "engine": {"seconds": seconds * 0.95, "sizes": [[256, 171], [512, 341]]},
            "settings": {"iterations": 500},
            "thumbnails": {"output": f"_thumbs/{name}.jpg", "content": f"_thumbs/_inputs/{i:032x}.jpg",
                           "styles": ["_thumbs/_inputs/" + "5" * 32 + ".jpg"]},
            "losses": {"iteration": its, "scale": [1 if k < records // 3 else 2 for k in its], "total": decay,
                       "content": [d * 0.2 for d in decay], "style": [d * 0.7 for d in decay],
                       "tv": [d * 0.1 for d in decay], "seconds": [k * 0.05 for k in its]},
        }
        path = root / f"{name}.json"  # written plainly: Storage's fsync per file would make this the slow part
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(metadata.encode(meta))
        log.add({"job": name, "status": "done", "seconds": seconds, "engine_seconds": seconds * 0.95})
    log.flush()
    summary = {"schema": runs.RUN_SCHEMA, "flow_run_id": "bench", "manifest": "bench.yaml", "output": str(root),
               "devices": ["cuda:0"], "started": "2026-12-02T02:00:00+00:00", "seconds": 3600.0,
               "engine_seconds": 3400.0, "counts": {"done": jobs, "skipped": 0, "failed": 0, "total": jobs},
               "failures": []}
    storage.write(runs.summary_uri(str(root), "bench"), json.dumps(summary).encode())
    return "bench"


def report_child(root: str) -> None:
    """Build the reports of the synthesized output at ``root`` (run "bench", then the whole output);
    print a JSON line with the figures. A fresh process, so its peak RSS is the reports' own."""
    from stylize.catalog.report import build_catalog_report, build_run_report
    from stylize.catalog.storage import Storage

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    run = build_run_report(Storage(), root, "bench")
    run_seconds = time.perf_counter() - started
    started = time.perf_counter()
    catalog = build_catalog_report(Storage(), root)
    catalog_seconds = time.perf_counter() - started
    size = sum(Path(p).stat().st_size for p in run.pages)
    print(json.dumps({"jobs": run.counts["done"], "run_s": run_seconds, "catalog_s": catalog_seconds,
                      "pages": len(run.pages), "html_mib": size / 2 ** 20, "catalog_done": catalog.counts["done"],
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "before_mib": before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--report-jobs", type=int, default=10_000, help="jobs of the synthesized output (0: skip)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.report_child:
        report_child(args.report_child)
        return

    rows = []
    for jobs in [j for j in args.jobs if j]:
        out = subprocess.run([sys.executable, __file__, "--child", str(jobs)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"catalog of {jobs} jobs failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if rows:
        print_flow(rows)
    if args.report_jobs:
        print_report(args.report_jobs)


def print_flow(rows: list[dict]) -> None:
    """The flow's figures per catalog size, and the targets."""
    print(f"{'jobs':>6} {'done':>6} {'wall s':>8} {'engine s':>9} {'overhead ms/job':>16} {'report ms/job':>14} "
          f"{'peak RSS MiB':>13}")
    for r in rows:
        overhead = 1000 * (r["wall"] - r["engine"]) / r["jobs"]
        r["overhead_ms"] = overhead
        print(f"{r['jobs']:>6} {r['done']:>6} {r['wall']:>8.1f} {r['engine']:>9.1f} {overhead:>16.1f} "
              f"{1000 * r['report'] / r['jobs']:>14.1f} {r['peak_mib']:>13.0f}")
    worst = max(r["overhead_ms"] for r in rows)
    print(f"target overhead < 50 ms/job, thumbnails and report included: {'met' if worst < 50 else 'NOT met'} "
          f"(worst {worst:.1f} ms)")
    if len(rows) >= 2:
        growth = rows[-1]["peak_mib"] / rows[0]["peak_mib"] - 1
        print(f"target peak RSS at {rows[-1]['jobs']} within 10% of {rows[0]['jobs']}: "
              f"{'met' if growth <= 0.10 else 'NOT met'} ({100 * growth:+.1f}%)")


def print_report(jobs: int) -> None:
    """Build the reports of a synthesized ``jobs``-job output in a fresh process; print the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        synthesize_output(Path(tmp), jobs)
        out = subprocess.run([sys.executable, __file__, "--report-child", tmp], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"report of {jobs} jobs failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"report of a {r['jobs']:,}-job output: run {r['run_s']:.1f} s ({r['pages']} pages, "
          f"{r['html_mib']:.0f} MiB of HTML), whole output {r['catalog_s']:.1f} s; peak RSS {r['peak_mib']:.0f} MiB "
          f"({r['before_mib']:.0f} MiB after imports)")
    worst = max(r["run_s"], r["catalog_s"])
    print(f"target report of {r['jobs']:,} jobs < 30 s: {'met' if worst < 30 else 'NOT met'} (worst {worst:.1f} s)")

if __name__ == "__main__":
    main()
