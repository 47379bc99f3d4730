"""How photos of different shapes share one batch: each level pads them to the batch's largest
height and width, and crops them back.

Each image gets at every level the size it has alone (``schedule.level_sizes``);
the batch tensor is that level's largest width by largest height, each image
at its top left and zeros elsewhere. ``Valid`` (``losses.py``) tells the
network and the losses where each image's pixels are, so each image's losses
and gradient are the ones it has alone; the gradient in the padding is zero,
so the optimizer never moves it. A batch of one shape needs none of this:
``valid`` is then None and the tensors are the images themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from stylize.engine.losses import Valid
from stylize.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """(w, h) per image and level, coarse to fine, and what the batch's tensor is at each level."""

    sizes: tuple[tuple[tuple[int, int], ...], ...]  # [image][level] -> (w, h)

    def __post_init__(self):
        levels = {len(per_image) for per_image in self.sizes}
        if len(levels) != 1:  # level_sizes gives every photo the same count; a caller mixing schedules does not
            raise ConfigError(f"a batch needs one level count for its images; found {sorted(levels)}")

    @property
    def levels(self) -> int:
        return len(self.sizes[0])

    @property
    def mixed(self) -> bool:
        """True when the images differ in shape, so the batch is padded."""
        return len(set(self.sizes)) > 1

    def level(self, k: int) -> list[tuple[int, int]]:
        """(w, h) of each image at level ``k`` (0 = coarsest)."""
        return [per_image[k] for per_image in self.sizes]

    def padded(self, k: int) -> tuple[int, int]:
        """(w, h) of the batch's tensor at level ``k``: the largest width and the largest height."""
        sizes = self.level(k)
        return max(w for w, _ in sizes), max(h for _, h in sizes)

    def valid(self, k: int) -> Valid | None:
        """Where each image's pixels are at level ``k``; None when the batch is not padded."""
        return Valid(tuple((h, w) for w, h in self.level(k))) if self.mixed else None

    def pad(self, parts: list[Tensor], k: int) -> Tensor:
        """One (1, c, h_i, w_i) tensor per image -> the (b, c, H, W) batch at level ``k``, zeros outside."""
        if not self.mixed:
            return torch.cat(parts)
        w, h = self.padded(k)
        return torch.cat([F.pad(p, (0, w - p.shape[-1], 0, h - p.shape[-2])) for p in parts])  # (b, c, H, W)

    def shrink(self, x: Tensor, k: int, j: int) -> Tensor:
        """The level-``k`` batch ``x`` resized to level ``j`` (each image to its own size there; differentiable)."""
        if not self.mixed:
            return shrink_to(x, self.sizes[0][j])
        return self.pad([shrink_to(self.crop(x, i, k), self.sizes[i][j]) for i in range(len(self.sizes))], j)

    def crop(self, x: Tensor, i: int, k: int) -> Tensor:
        """Image ``i`` of the level-``k`` batch ``x`` (b, c, H, W), at its own size: (1, c, h_i, w_i)."""
        w, h = self.sizes[i][k]
        return x[i:i + 1, :, :h, :w]


def shrink_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(b, c, h, w) -> (b, c, size[1], size[0]) with an antialiased bicubic filter (close to the Lanczos
    filter ``images.resize`` shrinks photos with); differentiable."""
    return F.interpolate(x, size=(size[1], size[0]), mode="bicubic", align_corners=False, antialias=True)
