"""Soak: does a long catalog run keep its memory flat?

Runs 2,000 tiny jobs (32 px, 1 iteration, distinct photos, one style) through
the ``stylize-catalog`` flow in this process and prints the process's resident
memory (VmRSS) every 250 finished jobs, sampled when the flow reports the job
(a ``JobFinished`` progress event). The target: RSS at the end within 5% of
RSS after the first 250 jobs (by then the model, Prefect's client and the
allocator's pools are warm; what grows after that grows with the jobs).

    .venv/bin/python benchmarks/soak.py                      # 2,000 jobs, a sample every 250
    .venv/bin/python benchmarks/soak.py --jobs 500 --every 100
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from catalog import make_catalog  # noqa: E402 - the benchmark next door builds the same kind of catalog


def rss_mib() -> float:
    """This process's resident set size in MiB, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


class RssSampler:
    """Records (finished jobs, RSS) every ``every`` jobs from the flow's ``JobFinished`` events."""

    def __init__(self, every: int):
        self.every = every
        self.samples: list[tuple[int, float]] = []
        self.started = time.perf_counter()

    def __call__(self, event) -> None:
        from stylize.catalog.progress import JobFinished

        if isinstance(event, JobFinished) and event.finished % self.every == 0:
            rss = rss_mib()
            self.samples.append((event.finished, rss))
            print(f"{event.finished:>6} jobs  RSS {rss:7.1f} MiB  "
                  f"({time.perf_counter() - self.started:6.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--every", type=int, default=250, help="jobs between RSS samples (default 250)")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_catalog(Path(tmp), args.jobs)  # its photos and style; one iteration, not two:
        manifest.write_text("version: 1\noutput: out\n"
                            "defaults: {size: 32, iterations: 1, scales: 1, precision: float32}\n"
                            "grid:\n  contents: [photos/]\n  styles: [style.png]\n")
        from flows.catalog import stylize_catalog
        from stylize.catalog.progress import reporting

        sampler = RssSampler(args.every)
        print(f"{args.jobs} jobs of 32 px, 1 iteration; RSS before the run {rss_mib():.1f} MiB", flush=True)
        with reporting(sampler):
            summary = stylize_catalog(manifest=str(manifest))

    c = summary["counts"]
    print(f"done {c['done']}, skipped {c['skipped']}, failed {c['failed']} in {summary['seconds']:.0f} s "
          f"(engine {summary['engine_seconds']:.0f} s)")
    if len(sampler.samples) >= 2:
        (first_jobs, first), (last_jobs, last) = sampler.samples[0], sampler.samples[-1]
        growth = last / first - 1
        print(f"RSS growth from {first_jobs} to {last_jobs} jobs: {100 * growth:+.1f}% "
              f"({first:.1f} -> {last:.1f} MiB); target < 5%: {'met' if growth < 0.05 else 'NOT met'}")


if __name__ == "__main__":
    main()
