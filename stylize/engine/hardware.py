"""What the device offers: which device, which precision, how much memory, how many images per batch.

Probing only; nothing here runs the network. ``budget.py`` turns the memory
figures into a plan per level, ``flows/`` asks ``max_batch`` how many images
to send a device.
"""

from __future__ import annotations

import resource

import torch

from stylize.errors import ConfigError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; ``cuda:N`` must exist."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} asked for, but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' asked for, but Apple MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU runs bf16 convolutions natively (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(spec: str, device: torch.device) -> torch.dtype:
    """The dtype of the VGG pass: bf16 where it is fast and supported, else float32."""
    if spec == "float32":
        return torch.float32
    if spec == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


#: Device memory per output pixel of one image in a batch: VGG19 activations to
#: relu5_1 kept for the backward pass (about 580 values per pixel over the
#: five blocks), their gradients, and the L-BFGS history (2 x 50 x 3 floats),
#: rounded up. An estimate for sizing batches, not a guarantee.
BYTES_PER_PIXEL = {torch.bfloat16: 3500, torch.float32: 6000}


#: Images per batch on the CPU in float32. Two images per oneDNN call keep the
#: cores busier than one: 0.91x and 0.98x the time per image in two runs of
#: benchmarks/engine.py at 512 px (2026-11-27), for about 1.45x the peak RSS.
#: In bfloat16 a batch of two was 1.16x and 1.01x, so 1.
CPU_FLOAT32_BATCH = 2


def available_memory() -> int | None:
    """Bytes of RAM available to new allocations (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def max_batch(device: torch.device, pixels: int, dtype: torch.dtype, *, cap: int = 32) -> int:
    """How many images of ``pixels`` output pixels fit one batch on ``device``.

    CUDA: from the free memory (70% of it, leaving room for the allocator and
    cuDNN workspaces). CPU: ``CPU_FLOAT32_BATCH`` in float32 when half the
    available RAM holds them, else 1. Elsewhere 1.
    """
    per_image = BYTES_PER_PIXEL.get(dtype, BYTES_PER_PIXEL[torch.float32]) * pixels
    if device.type == "cpu" and dtype == torch.float32:
        free = available_memory()
        return CPU_FLOAT32_BATCH if free is not None and CPU_FLOAT32_BATCH * per_image <= free // 2 else 1
    if device.type != "cuda":
        return 1
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, min(cap, int(0.7 * free // per_image)))


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes so far: CUDA memory allocated since the run began, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return None
