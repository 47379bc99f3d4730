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


def test_openmp_threads_sleep_while_waiting_unless_the_user_says_otherwise():
    """The engine sets OMP_WAIT_POLICY before torch loads (a spinning wait starves the working
    thread whenever anything else runs), and keeps a value the user set."""
    import os
    import subprocess

    # sys.modules keeps the order in which imports began: the engine's package before torch.
    probe = ("import os, sys; import flows.catalog; m = list(sys.modules); "
             "print(os.environ.get('OMP_WAIT_POLICY'), m.index('stylize.engine') < m.index('torch'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    unset = subprocess.run([sys.executable, "-c", probe], env=env, cwd=root, capture_output=True, text=True)
    assert unset.stdout.split() == ["PASSIVE", "True"], unset.stderr[-2000:]
    chosen = subprocess.run([sys.executable, "-c", probe], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, cwd=root,
                            capture_output=True, text=True)
    assert chosen.stdout.split() == ["ACTIVE", "True"], chosen.stderr[-2000:]
