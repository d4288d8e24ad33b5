"""Fault-injection points for crash tests. TEST-ONLY: never set ``LETHE_FAULT_KILL_AT`` in a deployment.

``LETHE_FAULT_KILL_AT=<point>`` makes the process kill itself with SIGKILL (no cleanup, no atexit: what an
OOM kill or a lost node looks like) when a job reaches that point:

- ``stage:<name>`` at the start of a pipeline stage (``stage:apply``, ``stage:verify``, ``stage:purge``,
  ``stage:audit``, ...), after its PROGRESS event is committed;
- ``registered`` after MLflow created the job's model version and before the job store records it (the
  exactly-once window of registration).

The crash tests start a worker with this variable, let it die at the point, and check that another worker
reclaims the job when the lease expires and finishes it exactly once. It is read from the environment, not
from :class:`service.settings.Settings`, on purpose: it is no setting a chart or an operator may use.
"""

from __future__ import annotations

import os
import signal

ENVIRONMENT_VARIABLE = "LETHE_FAULT_KILL_AT"


def point(name: str) -> None:
    """Die here (SIGKILL) when ``LETHE_FAULT_KILL_AT`` names this point; otherwise do nothing."""
    if os.environ.get(ENVIRONMENT_VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)
