"""The catalog flow's jobs on a Dask cluster: one job per GPU, on as many machines as it has.

``dask_task_runner(address)`` is a ``DaskTaskRunner`` (from the optional
``prefect-dask`` package, extra ``dask``): connected to an existing scheduler
(``tcp://host:8786``) or, with ``"local"``, to a cluster of worker processes
started on this machine for the run; ``flows.catalog.catalog_on_dask`` is the
flow with it. This module knows Dask, not the flow, so it imports nothing of
``flows.catalog``.

While the flow runs on Dask it submits every job under the annotation
``resources={"GPU": 1}`` (``job_resources``), so the scheduler starts a job
only on a worker with a free ``GPU`` resource: one job per GPU, whichever
machine it is on. Each worker should see one GPU and declare it, e.g.
``CUDA_VISIBLE_DEVICES=0 dask worker tcp://scheduler:8786 --nthreads 1 --resources GPU=1``
(a CPU-only worker declares ``GPU=1`` too: it is a job slot). A job runs on its
worker's own device (``worker_device``), so the in-process ``DevicePool`` that
shares one machine's GPUs between threads plays no part.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

from prefect.context import get_run_context

from stylize.errors import ConfigError

#: The Dask worker resource that stands for one GPU (or one CPU job slot).
GPU = "GPU"


def dask_task_runner(address: str = "local", *, n_workers: int | None = None):
    """A ``DaskTaskRunner`` on the Dask cluster at ``address``, or ``"local"``.

    A local cluster has ``n_workers`` worker processes (default: one per GPU of
    this machine, each seeing only its own GPU; without GPUs, one CPU worker),
    each declaring ``GPU=1``. A remote cluster has the workers it has, so
    ``n_workers`` is refused there.
    """
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError(
            "running on Dask needs the prefect-dask package; install it with: pip install 'stylize[dask]'"
        ) from None
    if address == "local":
        return DaskTaskRunner(**local_cluster(n_workers))
    if n_workers is not None:
        raise ConfigError(
            f"the number of workers ({n_workers}) sizes a local Dask cluster only; the cluster at {address} "
            "has the workers that were started for it"
        )
    if "://" not in address:
        raise ConfigError(f"Dask scheduler address {address!r}: expected 'local' or a URL like tcp://host:8786")
    return DaskTaskRunner(address=address)


def local_cluster(n_workers: int | None = None) -> dict[str, Any]:
    """``DaskTaskRunner`` arguments for a cluster of worker processes on this machine.

    With GPUs, worker ``i`` sees only GPU ``i`` (``CUDA_VISIBLE_DEVICES``), the
    way dask-cuda pins its workers; without, each worker gets an equal share of
    the cores for PyTorch (Dask's default would be one thread each).
    """
    import torch
    from distributed import Nanny, Scheduler, SpecCluster

    if n_workers is not None and n_workers < 1:
        raise ConfigError(f"a local Dask cluster needs at least 1 worker, found {n_workers}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and n_workers and n_workers > gpus:
        raise ConfigError(f"a local Dask cluster has one worker per GPU: asked for {n_workers}, found {gpus} GPU(s)")
    count = n_workers or gpus or 1
    threads = str(max(1, (os.cpu_count() or 1) // count))

    def env(i: int) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": str(i)} if gpus else {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}

    workers = {
        i: {"cls": Nanny, "options": {"nthreads": 1, "resources": {GPU: 1}, "env": env(i), "host": "127.0.0.1"}}
        for i in range(count)
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    return {"cluster_class": SpecCluster, "cluster_kwargs": {"workers": workers, "scheduler": scheduler}}


def dask_client():
    """The Dask client of this flow run's task runner, or None when its tasks run in this process."""
    # A DaskTaskRunner instance implies its module is loaded: looking there costs
    # nothing and keeps Dask out of runs that do not use it.
    module = sys.modules.get("prefect_dask.task_runners")
    runner = get_run_context().task_runner
    if module is None or not isinstance(runner, module.DaskTaskRunner):
        return None
    return runner.client


def cluster_gpus(client) -> int:
    """How many ``GPU`` resources the cluster's workers declare: jobs that can run at once.

    Raises when workers are connected but none declares one, since every job
    would then wait forever. A cluster with no worker yet (one that scales up on
    demand) counts as 0.
    """
    workers = client.scheduler_info(n_workers=-1)["workers"]
    gpus = sum(int(w.get("resources", {}).get(GPU, 0)) for w in workers.values())
    if workers and not gpus:
        raise ConfigError(
            f"none of the {len(workers)} worker(s) of the Dask cluster at {client.scheduler.address} declares a "
            f"{GPU} resource, so no job could start; start each worker with --resources {GPU}=1 (one per GPU)"
        )
    return gpus


@contextlib.contextmanager
def job_resources() -> Iterator[None]:
    """Tasks submitted inside need one ``GPU`` resource of the worker that runs them."""
    import dask

    with dask.annotate(resources={GPU: 1}):
        yield


def worker_device() -> str:
    """The device of the Dask worker running this task: its GPU, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
