"""The ``stylize`` command: a thin layer over the library and the flows.

Each command parses its arguments, calls the library (or runs a flow), and
turns a ``StylizeError`` into one line on stderr and an exit code:
0 success, 1 a job failed, 2 bad usage, settings or manifest, 130 Ctrl+C,
143 SIGTERM (``run`` and ``watch`` stop their running jobs first, and end
within seconds even when a request hangs: see ``stylize.app.interrupts``).
A failed run prints its table and one line per failure, never a traceback
(``-v`` logs it).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from stylize.app.flags import add_engine_options, engine_overrides
from stylize.app.interrupts import Terminated, bounded_interrupts
from stylize.errors import StylizeError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM

# Their DEBUG records print request headers, session tokens included: -v must not.
_CREDENTIAL_LOGGERS = ("boto3", "botocore", "s3transfer")


def _between(low: float, high: float, convert, noun: str, unit: str = ""):
    """An argparse type: a ``convert``-ed number from ``low`` to ``high``, else a one-line usage error."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, found {text!r}") from None
        if not low <= value <= high:  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"expected {low:g} to {high:g}{unit}, found {text}")
        return value

    parse.__name__ = "count" if convert is int else "seconds"  # argparse names the type in its messages
    return parse


def count_between(low: int, high: int):
    """An integer from ``low`` to ``high``."""
    return _between(low, high, int, "a whole number")


def seconds_between(low: float, high: float):
    """A finite number of seconds from ``low`` to ``high``."""
    return _between(low, high, float, "a number of seconds", " seconds")


def settings_from(overrides: dict):
    """Validate overrides into Settings; errors name the flag."""
    from pydantic import ValidationError

    from stylize.errors import ConfigError
    from stylize.engine.settings import Settings, settings_error_problems

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = settings_error_problems(exc)
        raise ConfigError("; ".join(f"--{p.replace('_', '-')}: {m}" if p else m for p, m in problems)) from None


def cmd_image(args: argparse.Namespace) -> int:
    """stylize image CONTENT STYLE [STYLE ...] -o OUT"""
    from stylize.app.view import ProgressView, printable
    from stylize.catalog import progress
    from stylize.catalog.jobs import JobRunner
    from stylize.engine import images
    from stylize.catalog.manifest import Job
    from stylize.catalog.outputs import claim
    from stylize.catalog.storage import Storage, parent

    overrides = engine_overrides(args)
    overrides["format"] = images.format_for(args.output)
    settings = settings_from(overrides)
    storage = Storage()
    out = args.output if "://" in args.output else os.path.abspath(args.output)
    meta = out.rsplit(".", 1)[0] + ".json"
    absolute = lambda p: p if "://" in p else os.path.abspath(p)  # noqa: E731
    if settings.init not in ("content", "random"):
        settings = settings.model_copy(update={"init": absolute(settings.init)})
    job = Job(
        name=Path(out).stem, content=absolute(args.content), styles=tuple(absolute(s) for s in args.styles),
        settings=settings, output=parent(out), source="", index=0,
    )
    claim(job, storage, out, meta, overwrite=args.overwrite)  # before the model loads; prepare checks again
    storage.probe(job.output)
    runner = JobRunner(args.device)
    report = lambda record: progress.emit(progress.Iteration(job.name, record, settings.iterations))  # noqa: E731
    with ProgressView(enabled=not args.quiet, transient=True):
        outcome = runner.run(job, storage, callback=report, skip_complete=False, image_uri=out, metadata_uri=meta,
                             thumbnails=False, overwrite=args.overwrite)
    if outcome.status == "failed":
        print(f"stylize: error: {printable(outcome.error)}", file=sys.stderr)
        return EXIT_FAILED
    f = outcome.final
    print(f"wrote {printable(out)} and {printable(meta)} in {outcome.seconds:.1f} s on {runner.device}: "
          f"{outcome.iterations} iterations, loss {f['total']:.4g} "
          f"(content {f['content']:.4g}, style {f['style']:.4g}, tv {f['tv']:.4g})")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The ``stylize`` argument parser with every subcommand."""
    from stylize import __version__

    parser = argparse.ArgumentParser(
        prog="stylize", description="Batch neural style transfer (Gatys et al.) on VGG19.",
    )
    parser.add_argument("--version", action="version", version=f"stylize {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("image", help="stylize one content image", description="Stylize one content image with "
                       "one or more style images; writes OUT and its metadata as OUT with a .json extension.")
    p.add_argument("content", help="content photo (path or s3:// URI)")
    p.add_argument("styles", nargs="+", metavar="style", help="style image(s)")
    p.add_argument("-o", "--output", required=True, help="output image; .png, .jpg, .webp or .tif (16-bit)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT or its .json even if stylize did not write them (an input is never replaced)")
    add_engine_options(p)
    p.set_defaults(func=cmd_image)

    for register in _extra_commands():  # manifest and flow commands
        register(sub)
    return parser


def _extra_commands():
    return [_register_catalog_commands, _register_watch_command, _register_serve_command, _register_report_command]


def cmd_validate(args: argparse.Namespace) -> int:
    """stylize validate MANIFEST"""
    from stylize.app.view import printable
    from stylize.catalog.manifest import load_manifest, validate

    count, problems = validate(args.manifest, allow_local=args.allow_local)
    if not problems:
        problems = output_problems(load_manifest(args.manifest, allow_local=args.allow_local))
    if problems:
        print(f"stylize: invalid manifest {printable(args.manifest)}: {len(problems)} problem(s)", file=sys.stderr)
        _print_problems(problems)
        return EXIT_USAGE
    print(f"{printable(args.manifest)}: valid, {count} job(s)")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    """Print each job a run would do ('run') or skip because its output is complete with the same inputs
    and settings ('skip'), then estimate the run's engine time from the seconds earlier jobs under the
    same output recorded (per megapixel-iteration, per device kind)."""
    from stylize.catalog import metadata
    from stylize.catalog.estimate import Estimate
    from stylize.catalog.storage import output_root
    from stylize.catalog.jobs import key_for, read_inputs
    from stylize.catalog.manifest import in_shard, load_manifest, parse_shard, storage_for
    from stylize.catalog.outputs import claim
    from stylize.app.view import printable

    doc = load_manifest(args.manifest, allow_local=args.allow_local)
    storage = storage_for(doc)
    shard = parse_shard(args.shard) if args.shard else None
    counts = {"run": 0, "skip": 0, "error": 0}
    unwritable = output_problems(doc, args.output)
    for _, message in unwritable:
        print(f"error output  {printable(message)}")
        counts["error"] += 1
    # An output that cannot be written has no history to estimate from (it may be a file).
    estimate = None if unwritable else Estimate(storage, output_root(args.output or doc.output))
    for job in doc.jobs(storage, output=args.output):
        if not in_shard(job, shard):
            continue
        try:
            meta = claim(job, storage) if job.problem is None else None
            inputs = read_inputs(job, storage)
            action = "skip" if metadata.is_complete(storage, job, key_for(job, inputs), meta) else "run"
            detail = job.image_uri
            if action == "run" and estimate is not None:
                estimate.add(job, inputs.content)
        except StylizeError as exc:
            action, detail = "error", str(exc)
        counts[action] += 1
        print(f"{action:5} {printable(job.name)}  {printable(detail)}")
    print(f"{counts['run']} to run, {counts['skip']} to skip, {counts['error']} with errors")
    for line in estimate.lines() if estimate is not None else []:
        print(line)
    return EXIT_OK


def output_problems(doc, output: str | None = None) -> list[tuple[str, str]]:
    """``[("output", why)]`` when the run's output root cannot be written, else ``[]``."""
    try:
        probe_output(doc, output)
    except StylizeError as exc:
        return [("output", str(exc))]
    return []


def probe_output(doc, output: str | None) -> None:
    """StorageError naming the output root and the reason when it cannot be written (``Storage.probe``).
    A transient failure passes: the flow probes again, with its retries."""
    from stylize.catalog.manifest import storage_for
    from stylize.catalog.storage import output_root
    from stylize.errors import TransientStorageError

    try:
        storage_for(doc).probe(output_root(output or doc.output))
    except TransientStorageError:
        pass


def _stop_runs() -> None:
    """Stop this process's catalog runs (from the interrupt watchdog's thread): if the flow module
    is not imported yet, no run has started, and importing from this thread could deadlock."""
    if catalog := sys.modules.get("flows.catalog"):
        catalog.stop_runs()


def cmd_run(args: argparse.Namespace) -> int:
    """stylize run MANIFEST: run the catalog flow in-process."""
    with bounded_interrupts(at_once=[_stop_runs]):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from stylize.errors import ConfigError
    from stylize.catalog.manifest import load_manifest, parse_shard
    from stylize.app.view import ProgressView, printable, quiet_failures, quiet_prefect

    doc = load_manifest(args.manifest, allow_local=args.allow_local)  # exit 2 on an invalid manifest before Prefect starts
    probe_output(doc, args.output)  # exit 1 at once when the output cannot be written
    if args.shard:
        parse_shard(args.shard)
    overrides = engine_overrides(args)
    if overrides:
        settings_from(overrides)
    quiet_prefect()
    from flows.api import ensure_api
    from flows.catalog import CatalogFailed, stylize_catalog

    catalog, workers = stylize_catalog, args.workers
    if args.dask:
        from flows.catalog import catalog_on_dask

        if args.device:
            raise ConfigError("--device picks this machine's devices; with --dask each job runs on a worker's GPU")
        catalog, workers = catalog_on_dask(args.dask, n_workers=args.workers), None
    ensure_api()
    with quiet_failures(verbose=args.verbose), ProgressView(enabled=not args.quiet) as view:
        state = catalog(
            manifest=args.manifest, output=args.output,
            devices=args.device.split(",") if args.device else None, workers=workers,
            max_failures=args.max_failures, shard=args.shard, settings=overrides or None,
            images_per_batch=args.images_per_batch, max_in_flight=args.max_in_flight,
            allow_local=args.allow_local, return_state=True,
        )
    result = state.result(raise_on_failure=False)
    if isinstance(result, CatalogFailed):
        summary = result.summary
    elif isinstance(result, dict):
        summary = result
    else:
        if isinstance(result, BaseException) and isinstance(result, StylizeError):
            raise result
        hint = "" if args.verbose else " (-v logs the traceback)"
        print(f"stylize: error: the run failed: {printable(result)}{hint}", file=sys.stderr)
        return EXIT_FAILED
    view.print_summary(summary)
    if summary.get("report_uri"):
        print(f"report: {printable(summary['report_uri'])}")
    return EXIT_FAILED if summary["counts"]["failed"] else EXIT_OK


def _register_catalog_commands(sub) -> None:
    p = sub.add_parser("validate", help="check a manifest without running anything",
                       description="Check a manifest and that its inputs exist; exit 0 and the number of "
                                   "jobs, or exit 2 and every problem with its field path.")
    p.add_argument("manifest", help="path or s3:// URI of a YAML manifest")
    _add_allow_local(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="list the jobs a run would do and skip, and estimate its time",
                       description=cmd_plan.__doc__)
    p.add_argument("manifest", help="path or s3:// URI of a YAML manifest")
    p.add_argument("--output", help="output root instead of the manifest's")
    p.add_argument("--shard", metavar="I/N", help="only the I-th of N disjoint parts")
    _add_allow_local(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="stylize every job of a manifest (Prefect flow, in-process)",
                       description="Run the stylize-catalog flow on this machine: every GPU (else the CPU), "
                                   "skipping finished jobs. Exit 0 if every job succeeded or was skipped, 1 if "
                                   "any failed, 2 for an invalid manifest.")
    p.add_argument("manifest", help="path or s3:// URI of a YAML manifest")
    _add_flow_options(p, workers_note=" (with --dask local: the number of Dask workers)")
    p.add_argument("--images-per-batch", type=count_between(1, 4096), metavar="N",
                   help="optimize up to N same-size images with the same styles together on one device "
                        "(default: on the CPU 2 in float32 and 1 in bf16, from free memory on CUDA)")
    p.add_argument("--max-in-flight", type=count_between(1, 1_000_000), metavar="N",
                   help="jobs submitted at a time; memory stays flat however long the catalog "
                        "(default 4 per device slot, at least 16)")
    p.add_argument("--dask", metavar="ADDRESS|local",
                   help="run the jobs on a Dask cluster, one per worker GPU resource: a scheduler address "
                        "(tcp://host:8786) or 'local' for worker processes here (one per GPU, else --workers "
                        "CPU workers); needs the 'dask' extra")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_allow_local(p)
    add_engine_options(p)
    p.set_defaults(func=cmd_run)


def _add_allow_local(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-local", action="append", metavar="DIR",
                   help="let a manifest read from S3 name local paths below DIR (repeatable); by default it "
                        "may name only s3:// URIs. Local manifests may name any path")


def _register_watch_command(sub) -> None:
    p = sub.add_parser("watch", help="start runs when manifests or images land in S3",
                       description="Consume S3 ObjectCreated notifications from an SQS queue (direct, via SNS, "
                                   "or EventBridge). A new manifest under --manifest-prefix starts a run of it; "
                                   "new images under --images-prefix, batched until uploads pause for "
                                   "--debounce seconds, start one run of --standing-manifest. Redelivered "
                                   "notifications start nothing twice. Runs until interrupted.")
    p.add_argument("--queue-url", required=True, help="SQS queue URL that receives the bucket's notifications")
    p.add_argument("--manifest-prefix", metavar="S3_PREFIX", help="new *.yaml/*.yml here start runs of themselves")
    p.add_argument("--images-prefix", metavar="S3_PREFIX", help="new images here start runs of --standing-manifest")
    p.add_argument("--standing-manifest", metavar="URI",
                   help="manifest whose grid covers --images-prefix; finished jobs are skipped on each run")
    p.add_argument("--debounce", type=seconds_between(0, 12 * 3600), default=60.0, metavar="SECONDS",
                   help="start the image run once uploads pause this long (default 60)")
    p.add_argument("--max-wait", type=seconds_between(0, 12 * 3600), metavar="SECONDS",
                   help="start it at the latest this long after the first image (default 10 x --debounce)")
    p.add_argument("--deployment", metavar="FLOW/DEPLOYMENT",
                   help="start runs of this Prefect deployment (e.g. stylize-catalog/catalog) and do not wait; "
                        "default: run the flow in this process, one run at a time")
    p.add_argument("--state-dir", default="~/.stylize/watch",
                   help="where in-process mode records the runs it started (default ~/.stylize/watch)")
    p.add_argument("--wait-seconds", type=int, default=20, metavar="S", help="SQS long-poll time, 0-20 (default 20)")
    p.add_argument("--retry-after", type=int, default=30, metavar="S",
                   help="a message whose run could not start or stopped short is delivered again after this "
                        "long; for image runs the wait doubles with each failure in a row, up to 15 min "
                        "(default 30)")
    p.set_defaults(func=cmd_watch)


def cmd_watch(args: argparse.Namespace) -> int:
    """stylize watch --queue-url URL: start catalog runs from S3 notifications."""
    from stylize.catalog.events import Routes, RunLedger
    from stylize.app.view import quiet_failures, quiet_prefect

    routes = Routes(manifest_prefix=args.manifest_prefix, images_prefix=args.images_prefix,
                    standing_manifest=args.standing_manifest)
    level = logging.DEBUG if args.verbose else logging.INFO
    for name in ("stylize.watch", "stylize.catalog.events"):
        logging.getLogger(name).setLevel(level)
    quiet_prefect()
    from flows.api import ensure_api
    from flows.watch import DeploymentRuns, InProcessRuns, Watcher, check_standing_manifest

    check_standing_manifest(routes)
    ledger = None if args.deployment else RunLedger(
        os.path.join(os.path.expanduser(args.state_dir), "started-runs.sqlite3"))
    runs = DeploymentRuns(args.deployment) if ledger is None else InProcessRuns(ledger)
    # On Ctrl+C or SIGTERM an in-process run frees its key as it unwinds; if unwinding hangs,
    # the watchdog frees it before ending the process, so the redelivered message runs again.
    last_rites = [runs.release_unfinished] if isinstance(runs, InProcessRuns) else []
    with bounded_interrupts(at_once=[_stop_runs], last_rites=last_rites), quiet_failures(verbose=args.verbose):
        if isinstance(runs, DeploymentRuns):
            runs.check()
        else:
            ensure_api()
        watcher = Watcher(args.queue_url, routes, runs, debounce=args.debounce, max_wait=args.max_wait,
                          wait_seconds=args.wait_seconds, retry_after=args.retry_after)
        watcher.run()
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """Register the deployment stylize-catalog/NAME for MANIFEST on the Prefect server at PREFECT_API_URL,
    with a cron schedule and at most one run at a time (a run that comes due while one is going waits for
    it), then run its flow runs on this machine until interrupted. Needs a running server: `prefect server
    start`."""
    from stylize.catalog.manifest import load_manifest, parse_shard

    def absolute(uri: str) -> str:  # flow runs start in their own process, maybe elsewhere
        return uri if "://" in uri else os.path.abspath(uri)

    manifest = absolute(args.manifest)
    load_manifest(manifest, allow_local=args.allow_local)  # exit 2 on an invalid manifest before anything is registered
    if args.shard:
        parse_shard(args.shard)
    overrides = engine_overrides(args)
    if overrides:
        settings_from(overrides)
    from flows.deploy import nightly_schedule, require_server, serve_catalog

    schedule = nightly_schedule(args.cron, args.timezone)
    url = require_server()
    given = {
        "output": absolute(args.output) if args.output else None,
        "devices": args.device.split(",") if args.device else None,
        "workers": args.workers, "shard": args.shard, "max_failures": args.max_failures,
        "settings": overrides or None, "allow_local": args.allow_local,
    }
    from stylize.app.view import printable

    print(f"serving stylize-catalog/{printable(args.name)} for {printable(manifest)} on {url}: cron '{args.cron}' ({args.timezone}), "
          "one run at a time; Ctrl+C stops serving and pauses the schedule", flush=True)
    serve_catalog(manifest, name=args.name, schedule=schedule,
                  parameters={k: v for k, v in given.items() if v is not None})
    return EXIT_OK


def _add_flow_options(p: argparse.ArgumentParser, workers_note: str = "") -> None:
    """The catalog flow's parameters that ``run`` and ``serve`` share."""
    p.add_argument("--output", help="output root instead of the manifest's")
    p.add_argument("--device", help="comma-separated devices, e.g. cuda:0,cuda:1 or cpu (default: all GPUs, else cpu)")
    p.add_argument("--workers", type=count_between(1, 1024), help="parallel jobs on the CPU, or at most this many GPUs" + workers_note)
    p.add_argument("--shard", metavar="I/N", help="run only the I-th of N disjoint parts (0-based)")
    p.add_argument("--max-failures", type=count_between(0, 2**31 - 1), default=0,
                   help="the flow run fails when more jobs than this fail (default 0)")


def _register_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="serve the catalog flow on a schedule (Prefect deployment, here)",
                       description=cmd_serve.__doc__)
    p.add_argument("manifest", help="path or s3:// URI of a YAML manifest")
    p.add_argument("--cron", default="0 2 * * *", help="when to run, five cron fields (default '0 2 * * *': 02:00)")
    p.add_argument("--timezone", default="UTC", help="IANA time zone of the cron schedule (default UTC)")
    p.add_argument("--name", default="nightly", help="deployment name (default nightly)")
    _add_flow_options(p)
    _add_allow_local(p)
    add_engine_options(p)
    p.set_defaults(func=cmd_serve)


def cmd_report(args: argparse.Namespace) -> int:
    """Build an HTML report (totals, failures, slowest jobs, thumbnails and loss curves) from the metadata
    files under OUTPUT alone: of one run with --run, else of every job and run recorded there. Unreadable
    metadata files are skipped and counted. `stylize run` writes OUTPUT/_runs/<run-id>.html itself."""
    from stylize.app.view import printable
    from stylize.catalog.report import build_catalog_report, build_run_report
    from stylize.catalog.storage import Storage, output_root

    root = output_root(args.output)
    storage = Storage(endpoint_url=args.endpoint_url)
    target = None if args.o is None else args.o if "://" in args.o else os.path.abspath(args.o)
    if args.run:
        report = build_run_report(storage, root, args.run, target=target, base_url=args.base_url)
    else:
        report = build_catalog_report(storage, root, target=target, base_url=args.base_url)
    c = report.counts
    print(f"wrote {printable(report.uri)} ({len(report.pages)} page(s)): {c.get('done', 0)} done, "
          f"{c.get('skipped', 0)} skipped, {c.get('failed', 0)} failed"
          + (f"; skipped {report.problems} unreadable metadata file(s), listed in the report"
             if report.problems else ""))
    return EXIT_OK


def _register_report_command(sub) -> None:
    p = sub.add_parser("report", help="rebuild the HTML report of a run, or of a whole output",
                       description=cmd_report.__doc__)
    p.add_argument("output", help="output root: a folder or s3://bucket/prefix")
    p.add_argument("--run", metavar="ID", help="only this run (its flow run id, as in OUTPUT/_runs/ID.json)")
    p.add_argument("-o", metavar="FILE", help="where to write the first page (default OUTPUT/_runs/ID.html, "
                                              "or OUTPUT/_runs/catalog.html); further pages go in FILE's "
                                              "folder, in a folder named after it")
    p.add_argument("--base-url", metavar="URL", help="link images at this HTTP(S) address of OUTPUT instead of "
                                                     "relative paths (for a report kept outside OUTPUT)")
    p.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (MinIO, R2...); default AWS_ENDPOINT_URL")
    p.set_defaults(func=cmd_report)


def _print_problems(problems: list[tuple[str, str]]) -> None:
    """A manifest's problems on stderr, one line each, control characters escaped."""
    from stylize.app.view import printable

    for path, message in problems:
        print(printable(f"  {path}: {message}" if path else f"  {message}"), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stylize`` console script."""
    from stylize.app.view import PrintableFormatter, printable
    from stylize.errors import ManifestError

    parser = build_parser()
    args = parser.parse_args(argv)
    fresh = not logging.getLogger().handlers  # else basicConfig adds none (an embedding program's)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if fresh:  # names in log lines (the watcher's object keys) reach the terminal escaped
        logging.getLogger().handlers[0].setFormatter(PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    for name in _CREDENTIAL_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))
    try:
        return args.func(args)
    except ManifestError as exc:
        print(f"stylize: invalid manifest {printable(exc.source)}:", file=sys.stderr)
        _print_problems(exc.problems)
        return EXIT_USAGE
    except StylizeError as exc:
        print(f"stylize: error: {printable(exc)}", file=sys.stderr)
        return EXIT_USAGE if type(exc).__name__ in ("ConfigError", "WeightsError") else EXIT_FAILED
    except Terminated:
        print("stylize: stopped by SIGTERM", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("stylize: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
