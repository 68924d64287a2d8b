"""Test-suite-wide setup.

The suite starts API and worker subprocesses beside the pytest process on a 2-core machine. With
OpenMP's default spin-waiting, torch processes sharing cores run 10x slower (docs/deploy.md,
"CPU threads"), so every process here sleeps while waiting. Set before torch is imported;
subprocesses inherit it.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Without a GPU, Triton kernels run in Triton's interpreter (numpy), which is how the "triton"
# recurrence backend is tested on CPU tensors (kru_core/recurrence/triton_backend.py). Read by
# triton when the kernels are defined; with a GPU the kernels compile (the gpu-marked tests).
if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")):
    os.environ.setdefault("TRITON_INTERPRET", "1")
