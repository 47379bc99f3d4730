"""Benchmark our engine on this machine's CPU: speed against ``pastiche``, and with ``--quality`` time to quality.

Run from the repository root:

    .venv/bin/python benchmarks/engine.py                    # 256 and 512 px, 20 iterations, batch 1 and 2
    .venv/bin/python benchmarks/engine.py --sizes 512 --iterations 30 --batches 1 2 4
    .venv/bin/python benchmarks/engine.py --sizes 512 --repeats 3 # best of 3 runs each, on a busy host
    .venv/bin/python benchmarks/engine.py --quick            # 64 and 128 px, 5 iterations (smoke test)
    .venv/bin/python benchmarks/engine.py --quality          # also time to quality at 512 px (~35 min on 2 cores)
    .venv/bin/python benchmarks/engine.py --quick --quality  # both parts as a smoke test (128 px, 10 iterations)

The two parts live in their own files, which say what each measures and how,
and run on their own too: ``engine_speed.py`` (ms per iteration, GFLOP/s and
share of the measured peak, batch sizes, peak RSS, against pastiche's CLI) and
``engine_quality.py`` (how soon the default schedule reaches the judged loss of
N fixed iterations). ``_common.py`` holds what they share: the analytic FLOPs
from VGG19's own tables, child processes, and the tables.
"""

from __future__ import annotations

import argparse
import os
import sys

import engine_quality
import engine_speed
from _common import child_main, cpu_model, load_average


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time our engine against the pastiche CLI (ms per L-BFGS iteration, "
                    "GFLOP/s, share of measured peak, peak RSS, batch sizes) and, with --quality, "
                    "the time each takes to reach a given judged loss.",
    )
    engine_speed.add_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: sizes 64 and 128, 5 iterations (overrides --sizes/--iterations); "
                             "with --quality also 128 px, 10 reference iterations, snapshots every 2, "
                             "precision check 5 (overrides the --quality options)")
    parser.add_argument("--quality", action="store_true",
                        help="also measure time to quality (about 35 minutes at the defaults on 2 cores)")
    parser.add_argument("--quality-only", action="store_true", help="only the time-to-quality part")
    engine_quality.add_arguments(parser)
    args = parser.parse_args(argv)
    args.quality = args.quality or args.quality_only
    engine_speed.check_arguments(parser, args)
    engine_quality.check_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if child_main(argv, {**engine_speed.CHILDREN, **engine_quality.CHILDREN}):
        return 0
    args = parse_args(argv)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; load average {load_average()}")
    if not args.quality_only:
        engine_speed.run_speed(args)
    if args.quality:
        engine_quality.run_in_dir(args)
    print(f"\nLoad average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
