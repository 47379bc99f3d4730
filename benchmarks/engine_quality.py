"""Time to quality: how soon our default schedule reaches the quality of N fixed L-BFGS iterations.

Run from the repository root (``benchmarks/engine.py --quality`` runs it after
the speed part, with the same options):

    .venv/bin/python benchmarks/engine_quality.py          # at 512 px (~35 min on 2 cores)
    .venv/bin/python benchmarks/engine_quality.py --quick  # 128 px, 10 iterations (smoke test)

At ``--quality-size`` px (default 512), with ``N = --reference-iterations``
(default 500). The content and style images are first resized once with our
resampling (longest side ``--quality-size``, style at ``style_scale`` 1) and
written as PNGs; every run and the judge read those, so every run starts from
the same pixels and aims at the same targets. Each run is its own subprocess:

a. ``pastiche`` CLI, N L-BFGS iterations, with its loss weights set so that
   it minimizes exactly our objective (see ``pastiche_weight_args``): content
   weight ``content_weight / 0.01`` (pastiche scales each content layer by
   0.01), style layer weights ``style_weight * w_l / C_l**2`` (its Gram is
   ``F F^T / (h w)``, ours also divides by ``C``), TV weight 0, style image at
   the same size as ours (``--style-size``);
b. our engine, N fixed full-size float32 iterations (one scale, no early
   stopping);
c. our engine with the default schedule (two scales, ``stop: done``,
   precision ``auto``, which is bf16 on CPUs with AVX-512 BF16 or AMX), taking
   an in-memory snapshot of the full-size level every ``--snapshot-every``
   iterations with the time it was taken (``Record.seconds`` of that
   iteration). With ``--quick`` its iteration budget per level is N, not the
   default, so that the smoke test ends soon;
c'. the same with ``stop: converged``, the higher-quality preset (the default
   schedule before issue 15);
d. our engine, ``--precision-check-iterations`` fixed full-size iterations in
   bfloat16; its float32 twin is run (b)'s snapshot at that iteration (the
   L-BFGS iterates do not depend on the iteration budget).

Every run, ours included, uses TV weight 0, so all of them minimize the same
function, content + style, and the judged loss *is* that objective.

Then a float32 child judges every image with ``Engine.judge`` (weighted
content and style loss, float32, at ``--quality-size``; lower is better).

What it reports:

* **seconds**: wall time of the optimization, setup included (loading the
  weights, style Grams): pastiche's last ``--info-step`` elapsed time (from
  its ``main``, after imports), our last ``Record.seconds`` (from the start of
  ``run``, the coarse level included). Neither includes interpreter start-up.
* **own loss**: the last loss each run reported for itself, before rounding
  to 8-bit pixels (pastiche prints the loss at the iterate before its last
  step; ours is after it). A check that both minimize the same objective.
* **judged content / style / total** of each final image.
* **Q**, the N-iteration quality (the issue's "500-iteration quality" at the
  defaults): the judged total of run (b). The **time to quality** of a
  schedule (c, c') is the time of its first snapshot (or its final image)
  whose judged total is at most Q, and at most Q + 1%; also against
  pastiche's judged total. Ratios to the times of (a) and (b). It is resolved
  to the snapshot interval.
* **cost**: a run's iterations in full-size units, each coarse iteration
  counted by its share of the full size's pixels: unlike seconds, it does not
  depend on the load of a shared machine.
* The ``stop: done`` target (issue 15): the default run takes at most
  ``TARGET_DONE_TIME_FRACTION`` of the ``converged`` preset's time, with its
  judged total within ``TARGET_DONE_LOSS_TOLERANCE`` of Q.
* The CPU targets from the issue: time to the 500-iteration quality at most
  ``TARGET_QUALITY_TIME_FRACTION`` of pastiche's N iterations, with the
  default schedule's final judged total at most pastiche's; and bf16 judged
  losses within ``TARGET_BF16_LOSS_TOLERANCE`` of float32 (run (d) against its
  float32 twin).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from _common import (DEFAULT_CONTENT, DEFAULT_STYLE, PASTICHE, check_pastiche, child_command, cpu_model, fmt,
                     load_average, load_image, parse_pastiche, print_columns, progress, relu_channels, resolve_images,
                     run_child, run_main, verdict)

#: Time to the 500-iteration quality, as a fraction of pastiche's 500 fixed iterations.
TARGET_QUALITY_TIME_FRACTION = 0.35
#: bf16 judged losses within this fraction of float32's.
TARGET_BF16_LOSS_TOLERANCE = 0.05
#: ``stop: done`` against ``stop: converged`` (the schedule before issue 15): at most this share of its
#: time, with the judged total within this fraction of Q.
TARGET_DONE_TIME_FRACTION = 0.6
TARGET_DONE_LOSS_TOLERANCE = 0.01

#: pastiche multiplies each content layer's MSE by this when ``content_layer_weights`` is
#: None, which its CLI passes unless ``--content-layer-weights`` is given
#: (``PasticheArtist._calc_loss``).
PASTICHE_CONTENT_LAYER_WEIGHT = 0.01


# --------------------------------------------------------------------------
# Children: each prints one JSON object on its last stdout line.


def child_quality_run(spec: dict) -> dict:
    """One quality run of our engine; writes its final image and snapshots as PNGs.

    ``spec``: ``settings`` (keyword arguments for ``Settings``), ``content`` and
    ``style`` (paths), ``out`` (path prefix for the PNGs). Snapshots are kept in
    memory during the run and written after it, so that writing them is not timed.
    """
    from stylize.engine.optimize import Engine, Record
    from stylize.engine.schedule import level_sizes
    from stylize.engine.settings import Settings

    settings = Settings(**spec["settings"])
    content_image, style_image = load_image(spec["content"]), load_image(spec["style"])
    # Levels too small to help are dropped, so the full-size level is the number of
    # levels actually run, which is ``settings.scales`` unless the image is small.
    full_level = len(level_sizes(*content_image.size, settings))
    records: list[Record] = []
    snapshots = []  # (iteration, seconds, image) at full size

    def on_snapshot(iteration: int, scale: int, image) -> None:
        # The callback has already seen this evaluation's record: its timestamp is the snapshot's.
        if scale == full_level:
            last = records[-1]
            assert (last.iteration, last.scale) == (iteration, scale), (last, iteration, scale)
            snapshots.append((iteration, last.seconds, image))

    result = Engine("cpu").run(content_image, [style_image], settings, callback=records.append,
                               snapshot=on_snapshot)
    final = f"{spec['out']}-final.png"
    result.image.save(final)
    saved = []
    for iteration, seconds, image in snapshots:
        path = f"{spec['out']}-{iteration:05d}.png"
        image.save(path)
        saved.append({"iteration": iteration, "seconds": seconds, "path": path})
    return {
        "size": list(result.sizes[-1]),
        "precision": result.precision,
        "seconds": records[-1].seconds,
        "iterations": records[-1].iteration,
        # Iterations per level: each level's last record minus the previous level's.
        "level_iterations": [max(r.iteration for r in records if r.scale == level)
                             for level in range(1, full_level + 1)],
        "level_sizes": [list(size) for size in result.sizes],
        "stopped_early": result.stopped_early,
        "own_loss": records[-1].total,
        "final": final,
        "snapshots": saved,
    }


def child_judge(spec: dict) -> dict:
    """Judged float32 content, style and total of every image in ``spec["images"]`` ({label: path})."""
    from stylize.engine.optimize import Engine
    from stylize.engine.settings import Settings

    settings = Settings(**spec["settings"])
    content_image, style_image = load_image(spec["content"]), load_image(spec["style"])
    engine = Engine("cpu")
    return {
        label: engine.judge(load_image(path), content_image, [style_image], settings, size=spec["size"])
        for label, path in spec["images"].items()
    }


CHILDREN = {"quality-run": child_quality_run, "judge": child_judge}


# --------------------------------------------------------------------------
# pastiche with our objective


def pastiche_layer(name: str) -> str:
    """Our layer name -> pastiche's: ``relu4_2`` -> ``block4_relu2``."""
    kind, index = re.fullmatch(r"([a-z]+)(\d_\d)", name).groups()
    block, position = index.split("_")
    return f"block{block}_{kind}{position}"


def pastiche_weight_args(settings) -> list[str]:
    """pastiche CLI options under which it minimizes our content + style loss for ``settings``.

    pastiche: content = ``content_weight * 0.01 * sum_layers mse(F, P)``; style =
    ``sum_l layer_weight_l * mse(G_l, A_l)`` with ``G = F F^T / (h w)``; TV is L1.
    Ours: content = ``content_weight * mean_layers mse(F, P)``; style =
    ``style_weight * sum_l w_l * mse(F F^T / (C h w), A_l)``, so a pastiche style
    layer weighs ``style_weight * w_l / C_l**2``. Both run the same Caffe VGG19 on
    0-255 BGR mean-subtracted pixels, so the features are the same. TV must be 0
    on both sides: the two TV terms differ (L1 on 0-255 against squares on 0-1).
    """
    channels = relu_channels()
    content_weight = settings.content_weight / len(settings.content_layers) / PASTICHE_CONTENT_LAYER_WEIGHT
    layer_weights = [settings.style_weight * w / channels[name] ** 2
                     for name, w in zip(settings.style_layers, settings.layer_weights())]
    return [
        "--content-layers", *map(pastiche_layer, settings.content_layers),
        "--style-layers", *map(pastiche_layer, settings.style_layers),
        "--content-weight", repr(content_weight),
        "--style-layer-weights", *map(repr, layer_weights),
        "--tv-weight", "0",
    ]


# --------------------------------------------------------------------------
# The runs


@dataclass
class QualityRun:
    """One optimization of the quality part and its judged images."""

    label: str
    seconds: float | None = None  # of the optimization, setup included
    iterations: str = ""  # what ran, for the table
    cost: float | None = None  # iterations in full-size units (a coarse one by its share of the pixels)
    precision: str = ""
    own_loss: float | None = None
    final: str | None = None  # path of the final image
    snapshots: list[dict] = field(default_factory=list)  # {"iteration", "seconds", "path"}
    peak_rss_mib: float | None = None
    error: str | None = None
    judged: dict[str, float] | None = None  # of the final image


@dataclass
class QualityRuns:
    """The runs of the quality part: (a) pastiche, (b) fixed float32, (c) default schedule, (c') the
    ``converged`` preset, (d) bf16 check."""

    pastiche: QualityRun
    fixed: QualityRun
    schedule: QualityRun
    fine: QualityRun
    bf16: QualityRun

    def all(self) -> list[QualityRun]:
        return [self.pastiche, self.fixed, self.schedule, self.fine, self.bf16]


def quality_settings(args: argparse.Namespace, **overrides) -> dict:
    """Keyword arguments for ``Settings`` of a quality run: defaults, TV off, at the quality size."""
    return {"size": args.quality_size, "tv_weight": 0.0, **overrides}


def run_ours(args: argparse.Namespace, label: str, inputs: dict[str, str], out: Path, **settings) -> QualityRun:
    """One quality run of our engine in a child."""
    run = QualityRun(label)
    progress(f"quality: {label}")
    spec = {"settings": quality_settings(args, **settings), **inputs, "out": str(out)}
    child = run_child(child_command(__file__, "quality-run", spec))
    run.peak_rss_mib, run.error = child.peak_rss_mib, child.failure()
    if run.error:
        return run
    report = child.report()
    run.seconds, run.precision, run.own_loss = report["seconds"], report["precision"], report["own_loss"]
    run.final, run.snapshots = report["final"], report["snapshots"]
    levels = report["level_iterations"]
    per_level = [b - a for a, b in zip([0, *levels], levels)]
    run.iterations = " + ".join(f"{count} (stopped early)" if early else str(count)
                                for count, early in zip(per_level, report["stopped_early"]))
    pixels = [w * h for w, h in report["level_sizes"]]
    run.cost = sum(count * p / pixels[-1] for count, p in zip(per_level, pixels))
    return run


def run_pastiche_quality(args: argparse.Namespace, inputs: dict[str, str], out: Path) -> QualityRun:
    """pastiche's CLI for ``--reference-iterations`` steps with weights matched to ours."""
    from stylize.engine.settings import Settings

    run = QualityRun(f"pastiche {version('pastiche')}, {args.reference_iterations} fixed, float32")
    if args.skip_pastiche:
        run.error = "skipped (--skip-pastiche)"
        return run
    progress(f"quality: {run.label}")
    settings = Settings(**quality_settings(args))
    child = run_child([
        str(PASTICHE), "--content", inputs["content"], "--styles", inputs["style"], "--output", str(out),
        # The inputs are already at this size, so pastiche's own resizing leaves them as they are.
        "--size", str(args.quality_size), "--style-size", str(args.quality_size),
        "--num-steps", str(args.reference_iterations), "--device", "cpu", "--info-step", "1", "--seed", "0",
        *pastiche_weight_args(settings),
    ])
    run.peak_rss_mib, run.error = child.peak_rss_mib, child.failure()
    if run.error:
        return run
    try:
        _dims, elapsed, losses = parse_pastiche(child.stdout)
    except ValueError as exc:
        run.error = str(exc)
        return run
    run.seconds, run.own_loss, run.final = elapsed[-1], losses[-1], str(out)
    run.iterations, run.precision = str(len(elapsed) - 1), "float32"
    run.cost = float(len(elapsed) - 1)
    return run


def prepare_inputs(args: argparse.Namespace, workdir: Path) -> dict[str, str]:
    """Content and style resized once, with our resampling, to the quality size; written as PNGs."""
    from stylize.engine import images
    from stylize.engine.settings import Settings

    style_scale = Settings().style_scale
    content, style = load_image(args.content), load_image(args.style)
    paths = {"content": workdir / "content.png", "style": workdir / "style.png"}
    images.resize(content, images.fit_size(*content.size, args.quality_size)).save(paths["content"])
    style_longest = max(1, round(args.quality_size * style_scale))
    images.resize(style, images.fit_size(*style.size, style_longest)).save(paths["style"])
    return {name: str(path) for name, path in paths.items()}


def run_all(args: argparse.Namespace, inputs: dict[str, str], workdir: Path) -> QualityRuns:
    """Runs (a) to (d), each in its own child."""
    from stylize.engine.settings import Settings

    n, p = args.reference_iterations, args.precision_check_iterations
    pastiche = run_pastiche_quality(args, inputs, workdir / "pastiche.png")
    fixed = run_ours(args, f"stylize {n} fixed, float32", inputs, workdir / "fixed-f32",
                     iterations=n, scales=1, tolerance=0, precision="float32", save_every=p)
    # In quick mode the schedules get the reference budget, so that they end soon.
    schedule_iterations = n if args.quick else Settings().iterations
    schedule = run_ours(args, f"stylize default schedule (stop: {Settings().stop})", inputs, workdir / "default",
                        iterations=schedule_iterations, save_every=args.snapshot_every)
    fine = run_ours(args, "stylize stop: converged (preset)", inputs, workdir / "converged",
                    iterations=schedule_iterations, save_every=args.snapshot_every, stop="converged")
    if p:
        bf16 = run_ours(args, f"stylize {p} fixed, bfloat16", inputs, workdir / "fixed-bf16",
                        iterations=p, scales=1, tolerance=0, precision="bfloat16")
    else:
        bf16 = QualityRun("stylize bfloat16 check", error="skipped (--precision-check-iterations 0)")
    return QualityRuns(pastiche, fixed, schedule, fine, bf16)


def judge_all(args: argparse.Namespace, inputs: dict[str, str], runs: QualityRuns) -> dict[str, dict]:
    """Judge every final image and snapshot of ``runs`` in one float32 child; {path: judged}."""
    paths = {path: path for run in runs.all() if not run.error
             for path in [run.final, *(s["path"] for s in run.snapshots)]}
    progress(f"quality: judging {len(paths)} images")
    spec = {"settings": quality_settings(args), **inputs, "size": args.quality_size, "images": paths}
    child = run_child(child_command(__file__, "judge", spec))
    if child.returncode != 0:
        sys.exit(f"judging failed: {child.failure()}")
    judged = child.report()
    for run in runs.all():
        if not run.error:
            run.judged = judged[run.final]
    return judged


def time_to(run: QualityRun, judged: dict[str, dict], threshold: float) -> tuple[float, str] | None:
    """(seconds, which image) of the first snapshot or final image of ``run`` with judged total <= threshold."""
    candidates = [(s["seconds"], f"iteration {s['iteration']}", s["path"]) for s in run.snapshots]
    candidates.append((run.seconds, "final image", run.final))
    for seconds, which, path in sorted(candidates, key=lambda c: c[0]):
        if judged[path]["total"] <= threshold:
            return seconds, which
    return None


def rel(a: float, b: float) -> str:
    """Relative difference of a to b, signed, as a percentage."""
    return f"{100 * (a / b - 1):+.2f}%"


# --------------------------------------------------------------------------
# Report


def print_runs(args: argparse.Namespace, inputs: dict[str, str], runs: QualityRuns) -> None:
    """What was run and the table of every run's time and judged losses."""
    from stylize.engine.settings import Settings

    defaults = Settings()
    w, h = load_image(inputs["content"]).size
    print(f"\nTime to quality at {w}x{h} px (--quality-size {args.quality_size}); content {args.content}, "
          f"style {args.style}.")
    print(f"Every run minimizes the same objective, content + style with TV weight 0 (our defaults: "
          f"content_weight {defaults.content_weight:g}, style_weight {defaults.style_weight:g}; pastiche's "
          f"weights matched: {' '.join(pastiche_weight_args(Settings(**quality_settings(args))))}).")
    print(f"Judged: Engine.judge, float32, at {w}x{h}: that same objective on the final 8-bit image.\n")
    header = ("run", "iterations", "precision", "seconds", "cost", "own loss", "judged content", "judged style",
              "judged total", "peak RSS MiB")
    lines = []
    for run in runs.all():
        j = run.judged or {}
        lines.append((
            run.label if not run.error else f"{run.label} (FAILED)", run.iterations, run.precision,
            fmt(run.seconds, ".1f"), fmt(run.cost, ".0f"), fmt(run.own_loss, ".4g"), fmt(j.get("content"), ".4g"),
            fmt(j.get("style"), ".4g"), fmt(j.get("total"), ".4g"), fmt(run.peak_rss_mib, ".0f"),
        ))
    print_columns(header, lines, left=3)
    print("seconds: the optimization, setup included (weights, style Grams; for the default schedule, the "
          "coarse level too);")
    print("cost: iterations in full-size units (a coarse iteration counts by its share of the pixels);")
    print("own loss: the last loss the run reported for itself, before rounding to 8-bit pixels "
          "(pastiche's is at the iterate before its last step).")
    for run in runs.all():
        if run.error:
            print(f"\n{run.label} failed: {run.error}")


def print_snapshots(args: argparse.Namespace, run: QualityRun, judged: dict[str, dict]) -> None:
    """A schedule's judged total at each snapshot of its full-size level."""
    if not run.snapshots or run.error:
        return
    print(f"\n{run.label}, full-size level, every {args.snapshot_every} iterations "
          "(iterations counted over the whole run):")
    lines = [(str(s["iteration"]), f"{s['seconds']:.1f}", f"{judged[s['path']]['total']:.4g}")
             for s in run.snapshots]
    lines.append(("final", f"{run.seconds:.1f}", f"{run.judged['total']:.4g}"))
    print_columns(("iteration", "seconds", "judged total"), lines, left=1)


def print_reached(run: QualityRun, runs: QualityRuns, judged: dict[str, dict], name: str,
                  threshold: float, n: int) -> tuple[float, str] | None:
    """When ``run`` first reaches a judged total of ``threshold`` (named ``name``), against (a) and (b)."""
    hit = time_to(run, judged, threshold)
    if hit is None:
        print(f"  {run.label} never reaches {name} ({threshold:.5g}) in its snapshots or final image")
        return None
    seconds, which = hit
    fixed, pastiche = runs.fixed, runs.pastiche
    ratios = [f"{seconds / fixed.seconds:.2f}x ours float32 {n} fixed ({fixed.seconds:.1f} s)"]
    if pastiche.seconds:
        ratios.insert(0, f"{seconds / pastiche.seconds:.2f}x pastiche {n} fixed ({pastiche.seconds:.1f} s)")
    print(f"  {run.label} reaches {name} at {seconds:.1f} s ({which}): {', '.join(ratios)}")
    return hit


def print_time_to_quality(args: argparse.Namespace, runs: QualityRuns,
                          judged: dict[str, dict]) -> tuple[float, str] | None:
    """Q, each run's final judged total against it, and when each schedule reaches Q; returns the default's."""
    n = args.reference_iterations
    pastiche, fixed = runs.pastiche, runs.fixed
    q = fixed.judged["total"]
    print(f"  Q, the {n}-iteration quality (stylize float32, {n} fixed): judged total {q:.5g} "
          f"in {fixed.seconds:.1f} s")
    targets = [("Q", q), ("Q + 1%", q * (1 + TARGET_DONE_LOSS_TOLERANCE))]
    if pastiche.judged is not None:
        print(f"  pastiche, {n} fixed: judged total {pastiche.judged['total']:.5g} ({rel(pastiche.judged['total'], q)} "
              f"vs Q) in {pastiche.seconds:.1f} s")
        targets.append(("pastiche's judged total", pastiche.judged["total"]))
    reached_q = None
    for run in (runs.schedule, runs.fine):
        if run.judged is None:
            continue
        print(f"  {run.label} ({run.precision}, {run.iterations} iterations, cost {run.cost:.0f}): final judged "
              f"total {run.judged['total']:.5g} ({rel(run.judged['total'], q)} vs Q) in {run.seconds:.1f} s")
        for name, threshold in targets:
            hit = print_reached(run, runs, judged, name, threshold, n)
            if run is runs.schedule and name == "Q":
                reached_q = hit
    if args.snapshot_every:
        print(f"  (time to quality is resolved to snapshots every {args.snapshot_every} iterations)")
    return reached_q


def print_done_target(runs: QualityRuns) -> None:
    """Issue 15: the default (``stop: done``) against the ``converged`` preset and Q."""
    done, fine, q = runs.schedule, runs.fine, runs.fixed.judged["total"]
    what = (f"default (stop: done) at most {TARGET_DONE_TIME_FRACTION}x the time of the converged preset, judged "
            f"total within {TARGET_DONE_LOSS_TOLERANCE:.0%} of Q")
    if done.judged is None or fine.judged is None:
        print(f"  [-------] {what}: not measured")
        return
    fraction, cost_fraction = done.seconds / fine.seconds, done.cost / fine.cost
    loss = done.judged["total"] / q - 1
    met = fraction <= TARGET_DONE_TIME_FRACTION and loss <= TARGET_DONE_LOSS_TOLERANCE
    print(f"  [{verdict(met)}] {what}: {fraction:.2f}x ({done.seconds:.1f} s vs {fine.seconds:.1f} s; cost "
          f"{cost_fraction:.2f}x, {done.cost:.0f} vs {fine.cost:.0f}), judged total {100 * loss:+.2f}% vs Q "
          f"(converged preset: {rel(fine.judged['total'], q)})")


def print_targets(args: argparse.Namespace, runs: QualityRuns, reached_q: tuple[float, str] | None,
                  judged: dict[str, dict]) -> None:
    """The issue's CPU targets: time to quality against pastiche, stop: done, and bf16 against float32."""
    n, p = args.reference_iterations, args.precision_check_iterations
    pastiche, schedule, bf16 = runs.pastiche, runs.schedule, runs.bf16
    print(f"\nTargets (issues), CPU, at {args.quality_size} px:")
    if pastiche.judged is None or not pastiche.seconds:
        print(f"  [-------] time to the {n}-iteration quality <= {TARGET_QUALITY_TIME_FRACTION}x pastiche's: "
              "pastiche did not run")
    else:
        fraction = None if reached_q is None else reached_q[0] / pastiche.seconds
        final_ok = schedule.judged["total"] <= pastiche.judged["total"]
        met = fraction is not None and fraction <= TARGET_QUALITY_TIME_FRACTION and final_ok
        when = ("never reached" if fraction is None
                else f"{fraction:.2f}x ({reached_q[0]:.1f} s vs {pastiche.seconds:.1f} s)")
        print(f"  [{verdict(met)}] time to the {n}-iteration quality at most {TARGET_QUALITY_TIME_FRACTION}x that "
              f"of {n} fixed pastiche iterations, at equal or better final losses: {when}; final judged total "
              f"{schedule.judged['total']:.5g} vs pastiche's {pastiche.judged['total']:.5g} "
              f"({'equal or better' if final_ok else 'worse'})")
    print_done_target(runs)
    twin = next((s for s in runs.fixed.snapshots if s["iteration"] == p), None)  # bf16's float32 twin
    if bf16.judged is None or twin is None:
        print(f"  [-------] bf16 judged losses within {TARGET_BF16_LOSS_TOLERANCE:.0%} of float32: not measured")
        return
    ref = judged[twin["path"]]
    diffs = {part: bf16.judged[part] / ref[part] - 1 for part in ("total", "content", "style")}
    met = abs(diffs["total"]) <= TARGET_BF16_LOSS_TOLERANCE
    print(f"  [{verdict(met)}] bf16 judged losses within {TARGET_BF16_LOSS_TOLERANCE:.0%} of float32 "
          f"({p} fixed iterations, one scale): total {bf16.judged['total']:.5g} vs {ref['total']:.5g} "
          f"({100 * diffs['total']:+.2f}%; content {100 * diffs['content']:+.2f}%, "
          f"style {100 * diffs['style']:+.2f}%)")


def run_quality(args: argparse.Namespace, workdir: Path) -> None:
    """The time-to-quality part: the runs, the judge, the tables and the targets."""
    inputs = prepare_inputs(args, workdir)
    runs = run_all(args, inputs, workdir)
    judged = judge_all(args, inputs, runs)
    print_runs(args, inputs, runs)
    print_snapshots(args, runs.schedule, judged)
    print_snapshots(args, runs.fine, judged)
    print(f"\nSummary, time to quality at {args.quality_size} px (TV weight 0 everywhere; judged = objective):")
    if runs.fixed.judged is None or runs.schedule.judged is None:
        print("  not measured: our fixed or default-schedule run failed")
        return
    reached_q = print_time_to_quality(args, runs, judged)
    print_targets(args, runs, reached_q, judged)


def run_in_dir(args: argparse.Namespace) -> None:
    """``run_quality`` in ``--quality-dir`` if given, else in a temporary directory."""
    if args.quality_dir is not None:
        args.quality_dir.mkdir(parents=True, exist_ok=True)
        run_quality(args, args.quality_dir.resolve())
        return
    with tempfile.TemporaryDirectory(prefix="stylize-quality-") as workdir:
        run_quality(args, Path(workdir))


# --------------------------------------------------------------------------
# Options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The time-to-quality options, in their own group."""
    quality = parser.add_argument_group("time to quality")
    quality.add_argument("--quality-size", type=int, default=512, help="longest side in px (default: 512)")
    quality.add_argument("--reference-iterations", type=int, default=500,
                         help="fixed L-BFGS iterations of pastiche and of our float32 reference (default: 500)")
    quality.add_argument("--snapshot-every", type=int, default=25,
                         help="iterations between snapshots of the default schedule (default: 25)")
    quality.add_argument("--precision-check-iterations", type=int, default=100,
                         help="fixed iterations of the bf16-vs-float32 check; at most --reference-iterations, "
                              "0 skips it (default: 100)")
    quality.add_argument("--skip-pastiche", action="store_true",
                         help="leave out pastiche's run (a), the slowest; its targets are then not measured")
    quality.add_argument("--quality-dir", type=Path,
                         help="keep the quality part's images here (default: a temporary directory)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate the quality options; ``--quick`` (set by the caller) makes them a smoke test."""
    if args.quick:
        args.quality_size, args.reference_iterations, args.snapshot_every = 128, 10, 2
        args.precision_check_iterations = 5
    if args.reference_iterations < 1 or args.snapshot_every < 1:
        parser.error("--reference-iterations and --snapshot-every must be at least 1")
    if not 0 <= args.precision_check_iterations <= args.reference_iterations:
        parser.error("--precision-check-iterations must be between 0 (no check) and --reference-iterations: its "
                     "float32 side is the float32 reference run's image at that iteration")
    resolve_images(parser, args)
    if not args.skip_pastiche:
        check_pastiche(parser)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="How soon our default schedule reaches the judged loss of "
                                     "N fixed L-BFGS iterations, against pastiche's N iterations.")
    parser.add_argument("--content", type=Path, default=DEFAULT_CONTENT, help="content image")
    parser.add_argument("--style", type=Path, default=DEFAULT_STYLE, help="style image")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 128 px, 10 reference iterations, snapshots every 2, precision check 5")
    add_arguments(parser)
    return run_main(parser, argv, check_arguments, run_in_dir, CHILDREN)


if __name__ == "__main__":
    sys.exit(main())
