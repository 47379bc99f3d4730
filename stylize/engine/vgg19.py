"""VGG19's architecture as names and numbers: its layers, their order and the convolutions' widths.

No torch here, so settings and the command line can name layers without loading the network
(``features.py`` builds it from these tables).
"""

from __future__ import annotations

from typing import Iterable

from stylize.errors import ConfigError

# (name, kind) in torchvision's ``vgg19().features`` order; kind is conv/relu/pool.
_BLOCKS = (2, 2, 4, 4, 4)


def _layer_table() -> tuple[tuple[str, str], ...]:
    table = []
    for block, convs in enumerate(_BLOCKS, start=1):
        for i in range(1, convs + 1):
            table.append((f"conv{block}_{i}", "conv"))
            table.append((f"relu{block}_{i}", "relu"))
        table.append((f"pool{block}", "pool"))
    return tuple(table)


LAYERS = _layer_table()
LAYER_NAMES: tuple[str, ...] = tuple(name for name, _ in LAYERS)
LAYER_INDEX = {name: i for i, name in enumerate(LAYER_NAMES)}
# Convolutions' (in, out) channels in order; conv index i is features.{2i+pools}.
CONV_CHANNELS = (
    (3, 64), (64, 64),
    (64, 128), (128, 128),
    (128, 256), (256, 256), (256, 256), (256, 256),
    (256, 512), (512, 512), (512, 512), (512, 512),
    (512, 512), (512, 512), (512, 512), (512, 512),
)
CONV_NAMES = tuple(name for name, kind in LAYERS if kind == "conv")


def check_layers(names: Iterable[str]) -> list[str]:
    """Return ``names`` as a list, or raise naming the unknown ones and the known ones."""
    names = list(names)
    unknown = [n for n in names if n not in LAYER_INDEX]
    if unknown:
        raise ConfigError(
            f"unknown VGG19 layer {', '.join(map(repr, unknown))}; known layers: {', '.join(LAYER_NAMES)}"
        )
    return names


def min_side(layers: Iterable[str]) -> int:
    """Smallest image side (px) for which every layer in ``layers`` has at least 1x1 output."""
    deepest = max(LAYER_INDEX[n] for n in check_layers(layers))
    pools = sum(1 for name, kind in LAYERS[: deepest + 1] if kind == "pool")
    return 2**pools
