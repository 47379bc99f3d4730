"""L-BFGS for a batch of independent images, each with its own history, step and curvature scale.

The two-loop recursion, as a few batched matrix products
---------------------------------------------------------
The textbook recursion walks the history pair by pair: two loops of ``m``
dot products and ``m`` vector updates, about ``7 m`` small operations per
iteration (350 at the default history of 50). On a GPU each is a kernel launch
of a few microseconds, which for one small image costs more than the VGG pass.

Its arithmetic needs only dot products between history vectors and the
gradient. With ``S`` and ``Y`` the (m, n) stacks of steps and gradient
changes, oldest first, ``U = triu(S Y^T, 1)`` and ``rho_i = 1 / (s_i . y_i)``
(0 for a pair that failed the curvature test), the first loop's coefficients
solve a unit upper-triangular system and the second loop's a unit
lower-triangular one::

    (I + diag(rho) U)   alpha = -rho * (S g)
    (I + diag(rho) U^T) beta  =  rho * (gamma (-(Y g) - (Y Y^T) alpha) + U^T alpha)
    d = -gamma g - gamma Y^T alpha + S^T (alpha - beta)

(expand the loops' running vector ``q`` to see it). So an iteration makes one
pass over the history for ``S g``, ``Y g`` and the new pair's products with
the others (one ``bmm`` with two columns, ``[g, y_new]``), two m x m
triangular solves, and one pass for ``d`` (one ``bmm``): the same memory
traffic as the loops, in a fixed handful of launches whatever ``m`` is.
``benchmarks/lbfgs.py`` counts them; ``tests/test_lbfgs.py`` checks the
directions against the loops.

The history is a ring buffer, (b, history, 2, n), allocated at the first
step; the m x m products are kept oldest first.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

#: L-BFGS history length. jcjohnson/neural-style and torch use 100; 50 halves
#: the memory (2 * 50 image-sized vectors) with no visible difference here.
LBFGS_HISTORY = 50
#: Largest per-pixel change (0-1 RGB units) of L-BFGS's first step: about 2.5 grey levels.
FIRST_STEP = 1e-2


class BatchedLBFGS:
    """L-BFGS without line search (as torch.optim.LBFGS and neural-style use it),
    for a batch of independent images: each image has its own history, step and
    curvature scale, so a batch gives the same iterates as running each image alone.

    ``step(evaluate)`` makes one update and evaluates once; ``evaluate()`` must
    return per-image losses, shape (b,), computed from ``x``.
    """

    def __init__(self, x: Tensor, *, lr: float = 1.0, history: int = LBFGS_HISTORY,
                 history_dtype: torch.dtype = torch.float32):
        b, small = x.shape[0], dict(device=x.device, dtype=x.dtype)
        self.x = x
        self.lr = lr
        self.history = history
        # bfloat16 halves the history's memory (a print-size level under a tight budget). The pairs keep
        # about 3 significant digits; the step, rho and gamma come from the float32 pair, and the products
        # with the history run in bfloat16 with float32 results.
        self.history_dtype = x.dtype if history_dtype == torch.float32 else history_dtype
        self.pairs: Tensor | None = None  # (b, history, 2, n): s and y per slot; allocated at the first step
        self.count = 0  # pairs held
        self.oldest = 0  # slot of the oldest pair once the buffer is full
        # Oldest first: sy[i, j] = s_i . y_j (used for i < j), yy[i, j] = y_i . y_j, and
        # hg[i] = (s_i . g, y_i . g) at the current gradient.
        self.sy = torch.zeros(b, history, history, **small)
        self.yy = torch.zeros(b, history, history, **small)
        self.hg = torch.zeros(b, history, 2, **small)
        self.rho = torch.zeros(b, history, **small)  # 0 where the pair failed the curvature test
        self.gamma = torch.ones(b, **small)  # initial inverse-Hessian scale; 1 until a pair passes
        self.curved = torch.zeros(b, dtype=torch.bool, device=x.device)  # has a curvature pair
        self.g: Tensor | None = None  # (b, n) gradient at x

    def _loss_and_grad(self, evaluate: Callable[[], Tensor]) -> Tensor:
        self.x.grad = None
        loss = evaluate()  # (b,)
        loss.sum().backward()
        # The gradient's own buffer, not a copy (an image-sized vector less at a print's peak): ``x.grad``
        # is let go, and each evaluation starts from None.
        self.g, self.x.grad = self.x.grad.detach().flatten(1), None  # (b, n)
        return loss.detach()

    def start(self, evaluate: Callable[[], Tensor]) -> Tensor:
        """Evaluate the starting point; returns its losses."""
        return self._loss_and_grad(evaluate)

    def _stack(self) -> Tensor:
        """(b, 2m, n) the held pairs as rows s, y, s, y, ... in slot order (a view)."""
        b, _, _, n = self.pairs.shape
        return self.pairs[:, :self.count].view(b, 2 * self.count, n)

    def _by_age(self, t: Tensor, slots_to_age: bool) -> Tensor:
        """Reorder dim 1 of ``t`` between slot order and oldest-first order (a no-op until the buffer wraps)."""
        if self.oldest == 0:
            return t
        return torch.roll(t, -self.oldest if slots_to_age else self.oldest, dims=1)

    def _direction(self, g: Tensor) -> Tensor:
        """The two-loop recursion's direction, per image, from the m x m products (see the module docstring)."""
        m = self.count
        if m == 0:
            return g.neg()
        rho = self.rho[:, :m, None]  # (b, m, 1)
        gamma = self.gamma[:, None, None]  # (b, 1, 1)
        upper = self.sy[:, :m, :m].triu(1)  # (b, m, m): s_i . y_j for i < j
        lower = upper.transpose(1, 2)
        sg, yg = self.hg[:, :m, :1], self.hg[:, :m, 1:]  # (b, m, 1) each
        alpha = torch.linalg.solve_triangular(rho * upper, -rho * sg, upper=True, unitriangular=True)
        yq = torch.baddbmm(yg, self.yy[:, :m, :m], alpha).neg_()  # y_i . q after the first loop
        beta = torch.linalg.solve_triangular(rho * lower, rho * torch.baddbmm(gamma * yq, lower, alpha),
                                             upper=False, unitriangular=True)
        coef = torch.cat([alpha - beta, -gamma * alpha], 2)  # (b, m, 2): weights of s_i and y_i
        stack = self._stack()
        coef = self._by_age(coef, slots_to_age=False).view(g.shape[0], 1, 2 * m).to(stack.dtype)
        d = torch.bmm(coef, stack).to(g.dtype)
        return d.view_as(g).sub_(g * self.gamma[:, None])  # (b, n)

    def step(self, evaluate: Callable[[], Tensor]) -> Tensor:
        """One update of every image in the batch, then one evaluation; returns the new losses."""
        g = self.g
        d = self._direction(g)
        # Until an image has a curvature pair, its step is scaled so that no
        # pixel moves more than FIRST_STEP (torch's rule, 1/|g|_1, gives steps
        # so small at image scale that float32 noise swamps the curvature pair).
        first = self.lr * FIRST_STEP / g.abs().amax(1).clamp_min(1e-30)  # (b,)
        t = torch.where(self.curved, torch.full_like(first, self.lr), first)
        if self.pairs is None:
            self.pairs = g.new_empty(g.shape[0], self.history, 2, g.shape[1], dtype=self.history_dtype)
        slot = self._make_room()
        s = d.mul_(t[:, None])  # (b, n) the step
        with torch.no_grad():
            self.x.add_(s.view_as(self.x))
        loss = self._loss_and_grad(evaluate)
        y = g.neg_().add_(self.g)  # (b, n) the gradient's change, in the old gradient's memory
        self.pairs[:, slot, 0].copy_(s)
        self.pairs[:, slot, 1].copy_(y)
        self._remember(s, y)
        return loss

    def _make_room(self) -> int:
        """The slot for the next pair: a free one, or the oldest's, whose products are then dropped."""
        if self.count < self.history:
            self.count += 1
            return self.count - 1
        slot = self.oldest
        self.oldest = (self.oldest + 1) % self.history
        for t in (self.sy, self.yy):
            t.copy_(torch.roll(t, (-1, -1), dims=(1, 2)))
        self.rho.copy_(torch.roll(self.rho, -1, dims=1))
        return slot

    def _remember(self, s: Tensor, y: Tensor) -> None:
        """Products of the newest pair (the last, oldest first) with the others and with the new gradient."""
        m, b = self.count, y.shape[0]
        stack = self._stack()
        # Every s_i and y_i against the new gradient and the new y: one column at a time, as stacking the
        # two would copy two image-sized vectors (at a print's top level, on top of the history). As v^T S^T:
        # S v with a bfloat16 S copies the whole history first (451 MiB for 10 pairs at 2048x1362), v^T S^T
        # reads it in place (float32 either way).
        products = torch.cat([torch.bmm(v.unsqueeze(1).to(stack.dtype), stack.transpose(1, 2)).transpose(1, 2)
                              for v in (self.g, y)], 2).to(y.dtype)  # (b, 2m, 2)
        products = self._by_age(products.view(b, m, 2, 2), slots_to_age=True)  # [pair, s|y, g|y_new]
        if stack.dtype != y.dtype:  # the newest pair's own products from its unrounded vectors
            products[:, m - 1, 0, 1] = torch.bmm(s.unsqueeze(1), y.unsqueeze(2)).view(b)
            products[:, m - 1, 1, 1] = torch.bmm(y.unsqueeze(1), y.unsqueeze(2)).view(b)
        self.hg[:, :m] = products[..., 0]
        self.sy[:, :m, m - 1] = products[:, :, 0, 1]  # s_i . y_new
        self.yy[:, :m, m - 1] = products[:, :, 1, 1]
        self.yy[:, m - 1, :m] = products[:, :, 1, 1]
        ys, yy = products[:, m - 1, 0, 1], products[:, m - 1, 1, 1]  # (b,)
        # Curvature test relative to the scale of y, so tiny (per-element
        # normalized) gradients are not mistaken for flat curvature.
        ok = ys > 1e-10 * yy.clamp_min(1e-30)
        self.rho[:, m - 1] = torch.where(ok, 1.0 / ys.where(ok, torch.ones_like(ys)), torch.zeros_like(ys))
        self.curved |= ok
        self.gamma = (ys / yy.clamp_min(1e-30)).where(ok, self.gamma)
