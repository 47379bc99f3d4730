"""Operator launches and CPU time per L-BFGS iteration: today's ``BatchedLBFGS`` against an earlier one.

A GPU proxy for the launch count: on the CPU, torch's profiler counts the
aten operators one optimizer step runs, outside the loss evaluation, and those
of them that compute (not views or allocations, and calling no other operator
that computes): what a GPU launches as kernels. The earlier version is read from git (``--before``, default the
commit whose recursion walked the history pair by pair), so the comparison
needs no copy of the old code in the project.

    python benchmarks/lbfgs.py                      # launch counts, b in (1, 4), history in (5, 20, 50)
    python benchmarks/lbfgs.py --time --pixels 262144  # plus ms per step at 512 x 512 with a full history
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: The last commit whose BatchedLBFGS ran the two-loop recursion pair by pair.
BEFORE = "3273bc4"


def load_before(rev: str) -> type:
    """``BatchedLBFGS`` as it was at ``rev``, loaded from git without touching the work tree."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:stylize/engine/lbfgs.py"],
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(f"lbfgs_at_{rev}")
    exec(compile(source, f"{rev}:stylize/engine/lbfgs.py", "exec"), module.__dict__)
    return module.BatchedLBFGS


def problem(b: int, n: int):
    """An image-sized smooth problem per batch element: a diagonal quadratic with a quartic term."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.logspace(-1, 2, n).repeat(b, 1)
    target = torch.randn(b, n, generator=gen)
    x = torch.zeros(b, n, requires_grad=True)
    return x, lambda: (0.5 * scale * x * x - target * x + 0.05 * x.pow(4)).sum(1)


#: Operators that only make views or allocate: no kernel runs for them on a GPU.
METADATA = {"aten::view", "aten::as_strided", "aten::as_strided_", "aten::alias", "aten::empty", "aten::empty_like",
            "aten::empty_strided", "aten::resize_", "aten::resolve_conj", "aten::resolve_neg", "aten::expand",
            "aten::transpose", "aten::slice", "aten::select", "aten::unsqueeze", "aten::reshape", "aten::t",
            "aten::permute", "aten::detach", "aten::_reshape_alias", "aten::lift_fresh", "aten::_unsafe_view",
            "aten::squeeze", "aten::unbind", "aten::narrow", "aten::flatten", "aten::view_as"}


def ops(fn) -> tuple[int, int]:
    """(aten operators, those that compute) that ``fn()`` runs. An operator computes when it is not a view or
    an allocation and none of the operators it calls computes: on a GPU, one kernel launch each."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]

    def computes(e) -> bool:
        return e.name not in METADATA and not any(computes(c) for c in e.cpu_children if c.name.startswith("aten::"))

    return len(events), sum(1 for e in events if computes(e))


def per_step(cls: type, b: int, n: int, history: int) -> tuple[int, int]:
    """Operators of one step with a full history, less those of the evaluation and its backward."""
    x, evaluate = problem(b, n)
    opt = cls(x, history=history)
    opt.start(evaluate)
    for _ in range(history + 2):  # fill the history, and wrap it once
        opt.step(evaluate)
    total = ops(lambda: opt.step(evaluate))
    evaluation = ops(lambda: opt._loss_and_grad(evaluate))
    return total[0] - evaluation[0], total[1] - evaluation[1]


def ms_per_step(cls: type, b: int, n: int, history: int, steps: int) -> float:
    """Milliseconds of the optimizer's part of a step (evaluation excluded), with a full history."""
    x, evaluate = problem(b, n)
    opt = cls(x, history=history)
    opt.start(evaluate)
    for _ in range(history):
        opt.step(evaluate)
    started = time.perf_counter()
    for _ in range(steps):
        opt.step(evaluate)
    stepping = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        opt._loss_and_grad(evaluate)
    return 1000 * (stepping - (time.perf_counter() - started)) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default=BEFORE, help=f"git revision of the earlier lbfgs.py (default {BEFORE})")
    parser.add_argument("--pixels", type=int, default=64 * 64, help="pixels per image (x3 channels; default 4096)")
    parser.add_argument("--time", action="store_true", help="also time a step at --pixels with history 50")
    parser.add_argument("--steps", type=int, default=10, help="steps timed (default 10)")
    args = parser.parse_args()
    from stylize.engine.lbfgs import BatchedLBFGS

    versions = {f"before ({args.before})": load_before(args.before), "now": BatchedLBFGS}
    n = 3 * args.pixels
    print(f"aten operators per L-BFGS step, evaluation excluded: all, and those that compute (a kernel launch "
          f"each on a GPU); n = {n}")
    print(f"{'version':<20} {'batch':>5} {'history':>7} {'all':>6} {'launch':>6}")
    for name, cls in versions.items():
        for b in (1, 4):
            for history in (5, 20, 50):
                total, launches = per_step(cls, b, n, history)
                print(f"{name:<20} {b:>5} {history:>7} {total:>6} {launches:>6}")
    if args.time:
        print(f"ms per step (optimizer only, history 50, CPU, {torch.get_num_threads()} threads), n = {n}")
        for name, cls in versions.items():
            for b in (1, 2):
                print(f"{name:<20} batch {b}: {ms_per_step(cls, b, n, 50, args.steps):8.1f} ms")


if __name__ == "__main__":
    main()
