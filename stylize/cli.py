"""The ``stylize`` command: a thin layer over the library and the flows.

Each command parses its arguments, calls the library (or runs a flow), and
turns a ``StylizeError`` into one line on stderr and an exit code:
0 success, 1 a job failed, 2 bad usage, settings or manifest.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from .errors import StylizeError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# Command-line flag -> Settings field, for the engine options every command shares.
ENGINE_FLAGS = {
    "size": "size",
    "iterations": "iterations",
    "content_weight": "content_weight",
    "style_weight": "style_weight",
    "tv_weight": "tv_weight",
    "optimizer": "optimizer",
    "learning_rate": "learning_rate",
    "init": "init",
    "seed": "seed",
    "weights": "weights",
    "pooling": "pooling",
    "style_blend": "style_blend",
    "style_scale": "style_scale",
    "preserve_color": "preserve_color",
    "scales": "scales",
    "tolerance": "tolerance",
    "save_every": "save_every",
    "content_layers": "content_layers",
    "style_layers": "style_layers",
    "style_layer_weights": "style_layer_weights",
    "precision": "precision",
    "quality": "quality",
    "max_pixels": "max_pixels",
}


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Flags for every engine setting; unset flags keep the library's defaults."""
    g = parser.add_argument_group("engine settings (defaults give a good picture at 512 px)")
    g.add_argument("--size", type=int, metavar="PX", help="longest side of the output in pixels (default 512)")
    g.add_argument(
        "--iterations", type=int, metavar="N",
        help="L-BFGS iterations at full size (default 500). With --scales N, each coarser level runs up to "
             "the same number at a quarter of the cost per halving (at most a third extra in all); early "
             "stopping (--tolerance) usually ends every level sooner",
    )
    g.add_argument("--content-weight", type=float, metavar="W", help="content loss weight (default 1)")
    g.add_argument("--style-weight", type=float, metavar="W", help="style loss weight (default 10)")
    g.add_argument("--tv-weight", type=float, metavar="W", help="total-variation weight (default 1e5)")
    g.add_argument("--optimizer", choices=["lbfgs", "adam"], help="default lbfgs")
    g.add_argument("--learning-rate", type=float, metavar="LR",
                   help="step size (default 1 for L-BFGS, 0.02 for Adam)")
    g.add_argument("--init", metavar="content|random|PATH", help="starting image (default content)")
    g.add_argument("--seed", type=int, help="seed for random init; same seed, same output on CPU (default 0)")
    g.add_argument("--weights", metavar="caffe|torchvision|PATH",
                   help="VGG19 weight set (default caffe, the original Caffe-trained network)")
    g.add_argument("--pooling", choices=["max", "avg"], help="default max")
    g.add_argument("--style-blend", type=float, nargs="+", metavar="W",
                   help="blend weights, one per style image (default equal)")
    g.add_argument("--style-scale", type=float, metavar="F",
                   help="style image size relative to the output (default 1.0)")
    g.add_argument("--preserve-color", action="store_true", default=None,
                   help="keep the content's colours (luminance-only transfer)")
    g.add_argument("--scales", type=int, metavar="N",
                   help="coarse-to-fine levels, each half the next; 1 = full size only (default 2)")
    g.add_argument("--tolerance", type=float, metavar="F",
                   help="stop a level when the loss improves by less than this fraction over 20 "
                        "iterations; 0 disables early stopping (default 1e-3)")
    g.add_argument("--save-every", type=int, metavar="N", help="save an intermediate image every N iterations")
    g.add_argument("--content-layers", nargs="+", metavar="LAYER", help="default relu4_2")
    g.add_argument("--style-layers", nargs="+", metavar="LAYER", help="default relu1_1 relu2_1 relu3_1 relu4_1 relu5_1")
    g.add_argument("--style-layer-weights", type=float, nargs="+", metavar="W", help="one per style layer")
    g.add_argument("--precision", choices=["auto", "float32", "bfloat16"],
                   help="VGG pass precision; auto uses bf16 where the hardware runs it fast (default auto)")
    g.add_argument("--quality", type=int, metavar="Q", help="JPEG/WebP quality (default 95)")
    g.add_argument("--max-pixels", type=int, metavar="N", help="pixel budget per output (default 4096*4096)")


def engine_overrides(args: argparse.Namespace) -> dict:
    """The engine settings given on the command line, as Settings fields."""
    out = {}
    for dest, field in ENGINE_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            out[field] = tuple(value) if isinstance(value, list) else value
    return out


def settings_from(overrides: dict):
    """Validate overrides into Settings; errors name the flag."""
    from pydantic import ValidationError

    from .errors import ConfigError
    from .settings import Settings, settings_error_problems

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = settings_error_problems(exc)
        raise ConfigError("; ".join(f"--{p.replace('_', '-')}: {m}" if p else m for p, m in problems)) from None


def cmd_image(args: argparse.Namespace) -> int:
    """stylize image CONTENT STYLE [STYLE ...] -o OUT"""
    from . import images
    from .jobs import JobRunner
    from .manifest import Job
    from .storage import Storage, parent

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
    runner = JobRunner(args.device)
    with _IterationProgress(settings, enabled=not args.quiet) as progress:
        outcome = runner.run(job, storage, callback=progress.update, skip_complete=False,
                             image_uri=out, metadata_uri=meta)
    if outcome.status == "failed":
        print(f"stylize: error: {outcome.error}", file=sys.stderr)
        return EXIT_FAILED
    f = outcome.final
    print(f"wrote {out} and {meta} in {outcome.seconds:.1f} s on {runner.device}: "
          f"{outcome.iterations} iterations, loss {f['total']:.4g} "
          f"(content {f['content']:.4g}, style {f['style']:.4g}, tv {f['tv']:.4g})")
    return EXIT_OK


class _IterationProgress:
    """A rich progress bar over iterations that shows the current losses."""

    def __init__(self, settings, *, enabled: bool = True):
        self.settings = settings
        self.enabled = enabled and sys.stderr.isatty() or os.environ.get("STYLIZE_PROGRESS") == "1"
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.fields[level]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[losses]}"), TimeElapsedColumn(),
                console=Console(stderr=True), transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("optimize", total=self.settings.iterations, level="", losses="")
            self._level = None
        return self

    def update(self, record) -> None:
        if self._progress is None:
            return
        if record.scale != self._level:
            self._level = record.scale
            self._progress.reset(self._task, total=self.settings.iterations)
            self._start = record.iteration
        self._progress.update(
            self._task, completed=record.iteration - self._start,
            level=f"scale {record.scale}",
            losses=f"loss {record.total:.4g} (c {record.content:.3g} s {record.style:.3g} tv {record.tv:.3g})",
        )

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()


def build_parser() -> argparse.ArgumentParser:
    """The ``stylize`` argument parser with every subcommand."""
    from . import __version__

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
    p.add_argument("-o", "--output", required=True, help="output image; .png, .jpg or .webp")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_engine_options(p)
    p.set_defaults(func=cmd_image)

    for register in _extra_commands():  # manifest and flow commands
        register(sub)
    return parser


def _extra_commands():
    return [_register_catalog_commands]


def cmd_validate(args: argparse.Namespace) -> int:
    """stylize validate MANIFEST"""
    from .manifest import validate

    count, problems = validate(args.manifest)
    if problems:
        print(f"stylize: invalid manifest {args.manifest}: {len(problems)} problem(s)", file=sys.stderr)
        for path, message in problems:
            print(f"  {path}: {message}" if path else f"  {message}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.manifest}: valid, {count} job(s)")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    """stylize plan MANIFEST: the jobs a run would do, and which it would skip."""
    from . import metadata
    from .jobs import key_for, read_inputs
    from .manifest import in_shard, load_manifest, parse_shard, storage_for

    doc = load_manifest(args.manifest)
    storage = storage_for(doc)
    shard = parse_shard(args.shard) if args.shard else None
    counts = {"run": 0, "skip": 0, "error": 0}
    for job in doc.jobs(storage, output=args.output):
        if not in_shard(job, shard):
            continue
        try:
            inputs = read_inputs(job, storage)
            action = "skip" if metadata.is_complete(storage, job, key_for(job, inputs)) else "run"
            detail = job.image_uri
        except StylizeError as exc:
            action, detail = "error", str(exc)
        counts[action] += 1
        print(f"{action:5} {job.name}  {detail}")
    print(f"{counts['run']} to run, {counts['skip']} to skip, {counts['error']} with errors")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """stylize run MANIFEST: run the catalog flow in-process."""
    from .manifest import load_manifest, parse_shard
    from .progress import RunView, quiet_prefect

    load_manifest(args.manifest)  # exit 2 on an invalid manifest before Prefect starts
    if args.shard:
        parse_shard(args.shard)
    overrides = engine_overrides(args)
    if overrides:
        settings_from(overrides)
    quiet_prefect()
    from flows.catalog import CatalogFailed, stylize_catalog

    with RunView(enabled=not args.quiet) as view:
        state = stylize_catalog(
            manifest=args.manifest, output=args.output,
            devices=args.device.split(",") if args.device else None, workers=args.workers,
            max_failures=args.max_failures, shard=args.shard, settings=overrides or None,
            return_state=True,
        )
    result = state.result(raise_on_failure=False)
    if isinstance(result, CatalogFailed):
        summary = result.summary
    elif isinstance(result, dict):
        summary = result
    else:
        if isinstance(result, BaseException) and isinstance(result, StylizeError):
            raise result
        print(f"stylize: error: the run failed: {result}", file=sys.stderr)
        return EXIT_FAILED
    view.print_summary(summary)
    return EXIT_FAILED if summary["counts"]["failed"] else EXIT_OK


def _register_catalog_commands(sub) -> None:
    p = sub.add_parser("validate", help="check a manifest without running anything",
                       description="Check a manifest and that its inputs exist; exit 0 and the number of "
                                   "jobs, or exit 2 and every problem with its field path.")
    p.add_argument("manifest", help="path or s3:// URI of a YAML manifest")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="list the jobs a run would do and skip",
                       description="Print each job a run would do ('run') or skip because its output is "
                                   "complete with the same inputs and settings ('skip').")
    p.add_argument("manifest", help="path or s3:// URI of a YAML manifest")
    p.add_argument("--output", help="output root instead of the manifest's")
    p.add_argument("--shard", metavar="I/N", help="only the I-th of N disjoint parts")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="stylize every job of a manifest (Prefect flow, in-process)",
                       description="Run the stylize-catalog flow on this machine: every GPU (else the CPU), "
                                   "skipping finished jobs. Exit 0 if every job succeeded or was skipped, 1 if "
                                   "any failed, 2 for an invalid manifest.")
    p.add_argument("manifest", help="path or s3:// URI of a YAML manifest")
    p.add_argument("--output", help="output root instead of the manifest's")
    p.add_argument("--device", help="comma-separated devices, e.g. cuda:0,cuda:1 or cpu (default: all GPUs, else cpu)")
    p.add_argument("--workers", type=int, help="parallel jobs on the CPU, or at most this many GPUs")
    p.add_argument("--shard", metavar="I/N", help="run only the I-th of N disjoint parts (0-based)")
    p.add_argument("--max-failures", type=int, default=0,
                   help="the flow run fails when more jobs than this fail (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_engine_options(p)
    p.set_defaults(func=cmd_run)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stylize`` console script."""
    from .errors import ManifestError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ManifestError as exc:
        print(f"stylize: invalid manifest {exc.source}:", file=sys.stderr)
        for path, message in exc.problems:
            print(f"  {path}: {message}" if path else f"  {message}", file=sys.stderr)
        return EXIT_USAGE
    except StylizeError as exc:
        print(f"stylize: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if type(exc).__name__ in ("ConfigError", "WeightsError") else EXIT_FAILED
    except KeyboardInterrupt:
        print("stylize: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
