"""L-BFGS for a batch of independent images, each with its own history, step and curvature scale."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

#: L-BFGS history length. jcjohnson/neural-style and torch use 100; 50 halves
#: the memory (2 * 50 image-sized vectors) with no visible difference here.
LBFGS_HISTORY = 50
#: Largest per-pixel change (0-1 RGB units) of L-BFGS's first step: about 2.5 grey levels.
FIRST_STEP = 1e-2


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products of (b, n) tensors -> (b,), without an (b, n) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[0])


class BatchedLBFGS:
    """L-BFGS without line search (as torch.optim.LBFGS and neural-style use it),
    for a batch of independent images: each image has its own history, step and
    curvature scale, so a batch gives the same iterates as running each image alone.

    ``step(evaluate)`` makes one update and evaluates once; ``evaluate()`` must
    return per-image losses, shape (b,), computed from ``x``.
    """

    def __init__(self, x: Tensor, *, lr: float = 1.0, history: int = LBFGS_HISTORY,
                 history_dtype: torch.dtype = torch.float32):
        self.x = x
        self.lr = lr
        self.history = history
        # bfloat16 halves the history's memory (a print-size level under a tight budget). The pairs keep
        # about 3 significant digits; rho and gamma come from the float32 pair, and the recursion
        # runs in float32 (one float32 copy of one pair at a time).
        self.history_dtype = history_dtype
        self.s: list[Tensor] = []  # each (b, n)
        self.y: list[Tensor] = []
        self.rho: list[Tensor] = []  # each (b,); 0 where the pair failed the curvature test
        self.gamma: Tensor | None = None  # (b,) initial Hessian scale
        self.curved = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)  # has a curvature pair
        self.g: Tensor | None = None  # (b, n) gradient at x

    def _loss_and_grad(self, evaluate: Callable[[], Tensor]) -> Tensor:
        self.x.grad = None
        loss = evaluate()  # (b,)
        loss.sum().backward()
        self.g = self.x.grad.detach().flatten(1).clone()  # (b, n)
        return loss.detach()

    def start(self, evaluate: Callable[[], Tensor]) -> Tensor:
        """Evaluate the starting point; returns its losses."""
        return self._loss_and_grad(evaluate)

    def _direction(self, g: Tensor) -> Tensor:
        """Two-loop recursion, per image. Dots are batched matrix products and updates
        fused multiply-adds, so no image-sized temporaries are made per history pair."""
        q = g.neg()
        alphas = []
        for s, y, rho in zip(reversed(self.s), reversed(self.y), reversed(self.rho)):
            s, y = s.to(q.dtype), y.to(q.dtype)  # no copy for a float32 history
            alpha = rho * _dot(s, q)  # (b,)
            q.addcmul_(y, alpha[:, None], value=-1.0)
            alphas.append(alpha)
        if self.gamma is not None:
            q.mul_(self.gamma[:, None])
        for s, y, rho, alpha in zip(self.s, self.y, self.rho, reversed(alphas)):
            s, y = s.to(q.dtype), y.to(q.dtype)
            beta = rho * _dot(y, q)
            q.addcmul_(s, (alpha - beta)[:, None])
        return q  # (b, n)

    def step(self, evaluate: Callable[[], Tensor]) -> Tensor:
        """One update of every image in the batch, then one evaluation; returns the new losses."""
        g = self.g
        d = self._direction(g)
        # Until an image has a curvature pair, its step is scaled so that no
        # pixel moves more than FIRST_STEP (torch's rule, 1/|g|_1, gives steps
        # so small at image scale that float32 noise swamps the curvature pair).
        first = self.lr * FIRST_STEP / g.abs().amax(1).clamp_min(1e-30)  # (b,)
        t = torch.where(self.curved, torch.full_like(first, self.lr), first)
        s = t[:, None] * d
        with torch.no_grad():
            self.x.add_(s.view_as(self.x))
        loss = self._loss_and_grad(evaluate)
        y = self.g - g
        ys = _dot(y, s)
        yy = _dot(y, y)
        # Curvature test relative to the scale of y, so tiny (per-element
        # normalized) gradients are not mistaken for flat curvature.
        ok = ys > 1e-10 * yy.clamp_min(1e-30)
        self.s.append(s.to(self.history_dtype))
        self.y.append(y.to(self.history_dtype))
        self.rho.append(torch.where(ok, 1.0 / ys.where(ok, torch.ones_like(ys)), torch.zeros_like(ys)))
        if len(self.s) > self.history:
            del self.s[0], self.y[0], self.rho[0]
        self.curved |= ok
        new_gamma = ys / yy.clamp_min(1e-30)
        self.gamma = new_gamma.where(ok, self.gamma if self.gamma is not None else torch.ones_like(ys))
        return loss
