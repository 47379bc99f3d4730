"""Device probing and batch sizing: how many images a device takes, and what memory it has."""

import sys

import torch

from stylize.engine import hardware


def test_cpu_batches_float32_in_pairs_when_memory_allows(monkeypatch):
    cpu, pixels = torch.device("cpu"), 512 * 512
    per_image = hardware.BYTES_PER_PIXEL[torch.float32] * pixels
    monkeypatch.setattr(hardware, "available_memory", lambda: 4 * per_image)
    assert hardware.max_batch(cpu, pixels, torch.float32) == hardware.CPU_FLOAT32_BATCH == 2
    assert hardware.max_batch(cpu, pixels, torch.bfloat16) == 1
    monkeypatch.setattr(hardware, "available_memory", lambda: 3 * per_image)  # two would take over half
    assert hardware.max_batch(cpu, pixels, torch.float32) == 1
    monkeypatch.setattr(hardware, "available_memory", lambda: None)
    assert hardware.max_batch(cpu, pixels, torch.float32) == 1


def test_available_memory_reads_meminfo():
    free = hardware.available_memory()
    if sys.platform == "linux":
        assert free is not None and 0 < free < 2**50
    else:
        assert free is None
