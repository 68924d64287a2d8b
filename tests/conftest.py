"""Test-suite-wide setup.

The suite starts API and worker subprocesses beside the pytest process on a 2-core machine. With
OpenMP's default spin-waiting, torch processes sharing cores run 10x slower (docs/deploy.md,
"CPU threads"), so every process here sleeps while waiting. Set before torch is imported;
subprocesses inherit it.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
