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

``--mixed`` runs a realistic catalog instead (issue 15): 120 photos cropped
from ``--data`` (default ``../shared/data``, else ``tests/data``) in six
shapes (4:3, 3:2, 16:9, 1:1, 3:4, 9:16; 36, 30, 18, 12, 14 and 10 photos,
interleaved), times 3 styles, at 64 px,
on ``--workers`` CPU slots with ``--images-per-batch``, and prints

* batch occupancy: images per ``Engine.run_batch`` call (each VGG19 pass of a
  call holds its images) over the images per batch asked for; target >= 0.9;
* device utilization: the engine's busy seconds (each call counted once) over
  wall time times slots, and the run summary's ``device_utilization``; target >= 0.95;
* wall time per job, and CPU seconds per job (this process's threads: less
  sensitive than wall time to other work on the machine).

``--before REV`` runs the same catalog on the code at git revision ``REV``
too (``git archive`` into a temporary folder), for a before/after table.

    .venv/bin/python benchmarks/catalog.py                       # 200 and 1,000 jobs; 10,000-job report
    .venv/bin/python benchmarks/catalog.py --jobs 50 --report-jobs 1000  # quick look
    .venv/bin/python benchmarks/catalog.py --mixed --before a74c4a9     # realistic catalog, before and after
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
        # One image per optimization, as in the figures measured before engine seconds became each
        # job's share of its batch: the overhead stays comparable.
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


#: The crops of the realistic catalog, as (w, h) ratios (landscape photo, DSLR, video, square, portraits) and
#: how many of its 120 photos have each: uneven, as in a real catalog, so some batches are left part full
#: by their shape alone.
MIXED_SHAPES = {(4, 3): 36, (3, 2): 30, (16, 9): 18, (1, 1): 12, (3, 4): 14, (9, 16): 10}


def mixed_shapes() -> list[tuple[int, int]]:
    """The 120 photos' shapes, interleaved through the catalog in proportion to their counts."""
    spots = [((j + 0.5) / n, k, shape) for k, (shape, n) in enumerate(MIXED_SHAPES.items()) for j in range(n)]
    return [shape for _, _, shape in sorted(spots)]


def make_mixed_catalog(folder: Path, data: Path, photos: int = 120, size: int = 64, iterations: int = 12) -> Path:
    """``photos`` crops of the content images in ``data`` (``data/content`` when there is one) in the shapes
    of ``mixed_shapes``, at offsets that move with the photo, longest side 2 x ``size``; 3 styles (the
    style images and a detail of the first), as a grid manifest."""
    from PIL import Image, ImageOps

    content = data / "content" if (data / "content").is_dir() else data
    style_dir = data / "styles" if (data / "styles").is_dir() else data
    styles = sorted(p for p in style_dir.iterdir() if p.name.startswith(("starry", "shipwreck")))
    sources = sorted(p for p in content.iterdir() if p.suffix in (".png", ".jpg") and p not in styles)
    (folder / "photos").mkdir(parents=True)
    (folder / "styles").mkdir()
    shapes = mixed_shapes()
    for i in range(photos):
        image = Image.open(sources[i % len(sources)]).convert("RGB")
        rw, rh = shapes[i * len(shapes) // photos]
        scale = min(image.width / rw, image.height / rh) * (0.6 + 0.4 * (i % 7) / 6)
        w, h = int(rw * scale), int(rh * scale)
        left, top = (image.width - w) * (i % 5) // 4, (image.height - h) * (i % 3) // 2
        crop = image.crop((left, top, left + w, top + h))
        crop.thumbnail((2 * size, 2 * size))
        crop.save(folder / "photos" / f"p{i:03d}.png")
    for path in styles[:2]:
        ImageOps.contain(Image.open(path).convert("RGB"), (2 * size, 2 * size)).save(folder / "styles" / path.name)
    first = Image.open(styles[0]).convert("RGB")
    detail = first.crop((first.width // 2, 0, first.width, first.height // 2))
    ImageOps.contain(detail, (2 * size, 2 * size)).save(folder / "styles" / "detail.png")
    manifest = folder / "manifest.yaml"
    manifest.write_text(
        "version: 1\noutput: out\n"
        f"defaults: {{size: {size}, iterations: {iterations}, scales: 1, precision: float32}}\n"
        "grid:\n  contents: [photos/]\n  styles: [styles/]\n"
    )
    return manifest


def mixed_child(data: str, workers: int, per_batch: int, iterations: int) -> None:
    """Run the realistic catalog in this process (on whatever ``flows`` the path gives: this tree or
    an older one) and print a JSON line: the engine's calls, images and busy seconds, wall time."""
    import threading

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a busy machine
    from stylize.catalog import jobs

    calls = {"calls": 0, "images": 0, "busy": 0.0}
    lock, run_batch = threading.Lock(), jobs.Engine.run_batch

    def counted(self, contents, *args, **kwargs):  # every batch the flow hands the engine, once
        started = time.perf_counter()
        try:
            return run_batch(self, contents, *args, **kwargs)
        finally:
            with lock:
                calls["calls"] += 1
                calls["images"] += len(contents)
                calls["busy"] += time.perf_counter() - started

    jobs.Engine.run_batch = counted
    from flows.catalog import stylize_catalog

    with tempfile.TemporaryDirectory() as tmp:
        warm = make_mixed_catalog(Path(tmp) / "warm", Path(data), photos=2, iterations=2)
        stylize_catalog(manifest=str(warm), devices=["cpu"], workers=workers, images_per_batch=per_batch)
        manifest = make_mixed_catalog(Path(tmp) / "run", Path(data), iterations=iterations)
        calls.update(calls=0, images=0, busy=0.0)
        load, cpu = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        summary = stylize_catalog(manifest=str(manifest), devices=["cpu"], workers=workers,
                                  images_per_batch=per_batch)
        wall = time.perf_counter() - started
        end = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = end.ru_utime + end.ru_stime - cpu.ru_utime - cpu.ru_stime  # this process's threads only
    print(json.dumps({**calls, "wall": wall, "cpu": cpu_seconds, "jobs": summary["counts"]["total"], "done": summary["counts"]["done"],
                      "summary_utilization": summary.get("device_utilization"), "load_before": load,
                      "load_after": os.getloadavg()[0]}))


def run_mixed(args) -> None:
    """The realistic catalog on this tree, and on ``--before`` when given; one row each."""
    here = Path(__file__).resolve().parents[1]
    trees = [("after", here)]
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            old = Path(tmp) / "before"
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(here), "archive", args.before], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
            trees.insert(0, (f"before ({args.before})", old))
        print_header(args)
        for label, tree in trees:
            command = [sys.executable, __file__, "--mixed-child", str(args.data), "--workers", str(args.workers),
                       "--images-per-batch", str(args.images_per_batch), "--iterations", str(args.iterations)]
            out = subprocess.run(command, capture_output=True, text=True, cwd=tmp,
                                 env=dict(os.environ, PYTHONPATH=str(tree)))
            if out.returncode != 0:
                sys.exit(f"{label}: the realistic catalog failed:\n{out.stderr[-3000:]}")
            last = print_row(label, json.loads(out.stdout.strip().splitlines()[-1]), args)
    print(f"target occupancy >= 0.9: {'met' if last['occupancy'] >= 0.9 else 'NOT met'} ({last['occupancy']:.2f}); "
          f"target utilization >= 0.95: {'met' if last['utilization'] >= 0.95 else 'NOT met'} "
          f"({last['utilization']:.2f}); load: 1-minute load average before/after the run")


def print_header(args) -> None:
    print(f"realistic catalog: 120 photos in 6 shapes x 3 styles, 64 px, {args.iterations} iterations, "
          f"{args.workers} CPU slots, images_per_batch {args.images_per_batch}")
    print(f"{'code':<22} {'jobs':>5} {'batches':>8} {'img/batch':>9} {'occupancy':>9} {'utilization':>11} "
          f"{'(summary)':>9} {'wall s':>7} {'s/job':>6} {'CPU s/job':>9} {'load':>9}", flush=True)


def print_row(label: str, r: dict, args) -> dict:
    """One tree's occupancy, utilization and wall time per job; returns ``r`` with the first two."""
    per_pass = r["images"] / r["calls"]
    r["occupancy"] = per_pass / args.images_per_batch
    r["utilization"] = r["busy"] / (r["wall"] * args.workers)
    summary = "-" if r["summary_utilization"] is None else f"{r['summary_utilization']:.2f}"
    print(f"{label:<22} {r['done']:>5} {r['calls']:>8} {per_pass:>9.2f} {r['occupancy']:>9.2f} "
          f"{r['utilization']:>11.2f} {summary:>9} {r['wall']:>7.1f} {r['wall'] / r['jobs']:>6.3f} "
          f"{r['cpu'] / r['jobs']:>9.3f} {r['load_before']:>4.1f}/{r['load_after']:<4.1f}", flush=True)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--report-jobs", type=int, default=10_000, help="jobs of the synthesized output (0: skip)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report-child", help=argparse.SUPPRESS)
    parser.add_argument("--mixed", action="store_true", help="the realistic catalog of mixed shapes (issue 15)")
    parser.add_argument("--before", help="with --mixed: also run it on the code at this git revision")
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    parser.add_argument("--data", type=Path, default=shared if shared.is_dir() else Path(__file__).parents[1] / "tests" / "data",
                        help="where the photos and styles are cropped from (default: ../shared/data, else tests/data)")
    parser.add_argument("--workers", type=int, default=2, help="with --mixed: CPU device slots")
    parser.add_argument("--images-per-batch", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--mixed-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mixed_child:
        mixed_child(args.mixed_child, args.workers, args.images_per_batch, args.iterations)
        return
    if args.mixed:
        run_mixed(args)
        return
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
