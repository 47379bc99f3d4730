"""The algorithm: VGG19 features, losses, the optimizer. Tensors only; never imports Prefect or rich."""

import os

# Before torch loads (no module of this package imports it before this line runs): OpenMP threads
# sleep while they wait instead of spinning. Spinning threads take the core from the thread doing
# the work whenever anything else runs beside the engine (a catalog's I/O threads, a Prefect
# server, a second worker, a shared host): on 2 cores at load 4 a 64-channel 32 px convolution
# took 32 ms spinning and 0.6 ms sleeping; on the same machine idle, 256 px iterations took
# 188-192 ms either way (2026-12-07). A value the user set wins; if torch was imported before
# stylize, its OpenMP runtime has already read the environment and this changes nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
